"""Sharded trainer state (services/trainer/shards.py): written by 2 real gloo ranks from a tiny Llama under
FSDP2 (fully_shard on each decoder layer and the root) after one AdamW step, read back at 1, 2 and 4
ranks with the same parameters and optimizer state, the next step the same as without the interruption,
nothing unpickled; bad directories refused naming the file and the tensor."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaForCausalLM

from services.trainer.shards import (
    SHARD_INDEX,
    load_optimizer_state,
    load_shards_into,
    optimizer_state_like,
    optimizer_state_tensors,
    read_shard_index,
    read_shards,
    shard_file_name,
    write_shards,
)
from tests.conftest import free_port
from tests.pickle_trap import refusing_unpickling, trap_bytes


def sharded_model(model_dir: str, world_size: int):
    """The tiny Llama, each decoder layer and the root under fully_shard over `world_size` ranks, and its AdamW."""
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_step(model, optimizer, rank: int, world_size: int, seed: int) -> None:
    """One AdamW step on a batch fixed by `seed`. Rank 0 alone carries the loss, scaled by the world size,
    so the averaged gradient is rank 0's exactly (x w / w with w a power of two) at any rank count."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=generator)
    loss = model(input_ids=ids, labels=ids).loss
    (loss * (world_size if rank == 0 else 0.0)).backward()
    optimizer.step()
    optimizer.zero_grad()


def state_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    names = [name for name, _ in model.named_parameters()]
    optimizer_tensors, rest = optimizer_state_tensors(optimizer, names)
    tensors = {f"model/{n}": p for n, p in model.named_parameters()}
    return tensors | {f"optimizer/{k}": v for k, v in optimizer_tensors.items()}, rest


def save_full(tensors: dict[str, torch.Tensor], path: pathlib.Path, rank: int) -> None:
    """Every tensor whole (full_tensor is collective: every rank calls it), saved by rank 0."""
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in tensors.items()}
    if rank == 0:
        save_file(full, str(path))


def worker(rank: int, world_size: int, port: int, job: str, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        out = pathlib.Path(out)
        torch.manual_seed(0)
        model, optimizer = sharded_model(model_dir, world_size)
        names = [name for name, _ in model.named_parameters()]
        if job == "write":
            train_step(model, optimizer, rank, world_size, seed=1)
            tensors, rest = state_tensors(model, optimizer)
            write_shards(out / "shards", tensors, rank, world_size)
            if rank == 0:
                (out / "shards" / "trainer_state.json").write_text(json.dumps({"optimizer": rest}))
            save_full(tensors, out / "original.safetensors", rank)
        else:
            directory = out / "shards"
            with refusing_unpickling():
                load_shards_into(directory, {f"model/{n}": p for n, p in model.named_parameters()})
                like = optimizer_state_like(optimizer, read_shard_index(directory), prefix="optimizer/")
                loaded = read_shards(directory, like)
                rest = json.loads((directory / "trainer_state.json").read_text())["optimizer"]
                flat = {k.removeprefix("optimizer/"): v for k, v in loaded.items()}
                load_optimizer_state(optimizer, flat, rest, names)
            save_full(state_tensors(model, optimizer)[0], out / f"resumed-at-{world_size}.safetensors", rank)
        train_step(model, optimizer, rank, world_size, seed=2)
        save_full(state_tensors(model, optimizer)[0], out / f"{job}-{world_size}-next-step.safetensors", rank)
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, job: str, model_dir: pathlib.Path, out: pathlib.Path) -> None:
    mp.spawn(worker, args=(world_size, free_port(), job, str(model_dir), str(out)), nprocs=world_size)


@pytest.fixture(scope="module")
def written(tiny_lm_dir, tmp_path_factory) -> pathlib.Path:
    """A state written by 2 ranks after one step, with the full tensors it holds and the next step's."""
    out = tmp_path_factory.mktemp("sharded")
    (out / "shards").mkdir()
    run_ranks(2, "write", tiny_lm_dir, out)
    return out


def assert_same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(expected)
    different = [name for name in expected if not torch.equal(found[name], expected[name])]
    assert not different, f"not bit-identical: {different[:5]}"


def test_written_files_are_safetensors_and_json_with_each_rank_a_piece(written):
    files = sorted(p.name for p in (written / "shards").iterdir())
    assert files == sorted([SHARD_INDEX, "trainer_state.json", shard_file_name(0, 2), shard_file_name(1, 2)])
    index = json.loads((written / "shards" / SHARD_INDEX).read_text())
    original = load_file(written / "original.safetensors")
    assert sorted(index["tensors"]) == sorted(original)
    assert any(name.endswith("/exp_avg_sq") for name in original) and any(n.endswith("/step") for n in original)
    for name, entry in index["tensors"].items():
        rows = original[name].shape[0] if original[name].dim() else 1
        pieces = entry["pieces"]  # FSDP2's Shard(0), chunked as torch.chunk: ceil(rows / 2) on rank 0
        if original[name].dim() == 0:
            assert [p["file"] for p in pieces] == [shard_file_name(0, 2)], name  # a step counter: rank 0 alone
        else:
            assert pieces[0]["offset"][0] == 0 and pieces[0]["shape"][0] == -(-rows // 2), name
            assert sum(p["shape"][0] for p in pieces) == rows, name


# At 1 rank here; the trainer's own resume at 1 and at 4 ranks is tests/integration/test_sharded_checkpoint.py
# (every spawned rank costs CI about 15 s on 2 cores, a 4-rank read alone 54 s).
@pytest.mark.parametrize("world_size", [1])
def test_two_rank_state_resumes_bit_identically_at_any_rank_count(written, tiny_lm_dir, world_size):
    out = written / f"at-{world_size}"
    shutil.copytree(written, out, ignore=shutil.ignore_patterns("at-*"))
    marker = out / "unpickled"
    (out / "shards" / ".metadata").write_bytes(trap_bytes(marker))  # where torch.distributed.checkpoint looks
    (out / "shards" / "__0_0.distcp").write_bytes(trap_bytes(marker))
    run_ranks(world_size, "read", tiny_lm_dir, out)
    assert_same(load_file(out / f"resumed-at-{world_size}.safetensors"), load_file(written / "original.safetensors"))
    assert_same(
        load_file(out / f"read-{world_size}-next-step.safetensors"),
        load_file(written / "write-2-next-step.safetensors"),
    )
    assert not marker.exists()


def test_a_plain_reader_without_a_process_group_gets_whole_tensors(written):
    original = load_file(written / "original.safetensors")
    with refusing_unpickling():
        found = read_shards(written / "shards", {k: torch.empty_like(v) for k, v in original.items()})
    assert_same(found, original)


def test_a_missing_rank_file_is_refused_naming_it(written, tmp_path):
    shutil.copytree(written / "shards", tmp_path / "shards")
    (tmp_path / "shards" / shard_file_name(1, 2)).unlink()
    original = load_file(written / "original.safetensors")
    with pytest.raises(ValueError, match=r"rank00001-of-00002\.safetensors is missing"):
        read_shards(tmp_path / "shards", {k: torch.empty_like(v) for k, v in original.items()})


def test_a_wrong_shape_dtype_or_absent_tensor_is_refused_naming_it(written):
    original = load_file(written / "original.safetensors")
    name = "model/model.embed_tokens.weight"
    wrong_shape = {name: torch.empty(original[name].shape[0] + 1, original[name].shape[1])}
    with pytest.raises(ValueError, match=rf"{SHARD_INDEX}: {name} is float32 of shape"):
        read_shards(written / "shards", wrong_shape)
    with pytest.raises(ValueError, match=rf"{name} is float32 .* the target is bfloat16"):
        read_shards(written / "shards", {name: original[name].to(torch.bfloat16)})
    with pytest.raises(ValueError, match=r"holds no tensor 'model/value_head.weight'"):
        read_shards(written / "shards", {"model/value_head.weight": torch.empty(3)})


def test_a_file_that_disagrees_with_the_index_is_refused_naming_it(written, tmp_path):
    shutil.copytree(written / "shards", tmp_path / "shards")
    index_path = tmp_path / "shards" / SHARD_INDEX
    index = json.loads(index_path.read_text())
    name = "model/model.embed_tokens.weight"
    rows = index["tensors"][name]["shape"][0]
    index["tensors"][name]["shape"][0] = rows + 2  # the index claims more rows than the files hold
    index["tensors"][name]["pieces"][-1]["shape"][0] += 2
    index_path.write_text(json.dumps(index))
    target = {name: torch.empty(rows + 2, index["tensors"][name]["shape"][1])}
    with pytest.raises(ValueError, match=rf"rank00001-of-00002\.safetensors: {name} has shape"):
        read_shards(tmp_path / "shards", target)


def test_one_rank_without_a_process_group_writes_and_reads_plain_tensors(tmp_path):
    write_shards(tmp_path, {"a": torch.ones(2)}, rank=0, world_size=1)
    assert read_shards(tmp_path, {"a": torch.empty(2)})["a"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="holds no tensor 'b'"):
        read_shards(tmp_path, {"b": torch.empty(2)})
