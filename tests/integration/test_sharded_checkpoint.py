"""The trainer's sharded checkpoint (issue #15) under real gloo processes: persisted at 2 fsdp ranks through
the trainer's own persist path, the AdamW state and the critic land as one shard file per rank (never
gathered), the weights as a plain Hugging Face model directory. Resumed by a plain process (no process
group) and at 4 fsdp ranks (LoRA: by a plain process), weights, AdamW moments and critic equal the
persisted ones, and one more update equals the one the persisting trainer made without the
interruption; nothing read back is a pickle. At 4 ranks each rank read exactly its rows of
model.safetensors (a quarter), never the whole file."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from services.common.checkpoints import checkpoint_problem, load_weights_into, weight_files
from services.trainer import gathering
from services.trainer.shards import SHARD_INDEX, shard_file_name
from tests.pickle_trap import trap_bytes

from .parallel_worker import build_trainer, max_abs_diff, run_ranks

TOLERANCE = 1e-5  # one more update: float32 sums in another order at another rank count
EXTRAS = {"gae": {"advantage": "gae"}, "lora": {"lora": {"enabled": True, "r": 4, "alpha": 8}}}


@pytest.fixture(scope="module")
def persisted(tiny_lm_dir, tmp_path_factory):
    """persist(extra, world) -> (root, options, ranks): version 1 persisted at `world` ranks (fsdp), once."""
    done = {}

    def persist(extra: str, world: int):
        if (extra, world) not in done:
            root = tmp_path_factory.mktemp(f"persisted-{extra}-{world}")
            options = {**EXTRAS[extra], "checkpoint_dir": str(root / "checkpoints")}
            ranks = run_ranks(
                world, tiny_lm_dir, root / "persist", {**options, "parallelism": "fsdp", "task": "persist"}
            )
            print(f"{extra}: shard write seconds per rank at {world}: {[r['persist_seconds'] for r in ranks]}")
            version = root / "checkpoints" / "v000001"
            for trap in (".metadata", "optimizer.pt", "__0_0.distcp"):  # where a careless reader would look
                (version / trap).write_bytes(trap_bytes(root / "unpickled"))
            done[extra, world] = root, options, ranks
        return done[extra, world]

    return persist


def test_the_ranks_write_the_optimizer_and_critic_as_shards_beside_a_plain_hf_model(persisted, tiny_lm_dir):
    root, _, ranks = persisted("gae", 2)
    path = root / "checkpoints" / "v000001"
    assert checkpoint_problem(path) is None  # every rank's file is in the manifest, checksummed
    manifest = json.loads((path / "MANIFEST.json").read_text())["files"]
    for name in (shard_file_name(0, 2), shard_file_name(1, 2), SHARD_INDEX, "model.safetensors", "config.json"):
        assert name in manifest, name
    with safe_open(path / "trainer_state.safetensors", framework="pt") as handle:
        assert sorted(handle.keys()) == ["rng/shuffle", "rng/torch"]  # nothing gathered to rank 0
    index = json.loads((path / SHARD_INDEX).read_text())
    moments = [name for name in index["tensors"] if name.endswith("/exp_avg_sq")]
    assert moments and "value_head/linear.weight" in index["tensors"]
    for name in moments + ["value_head/linear.weight"]:
        entry = index["tensors"][name]
        if entry["shape"][0] >= 2:  # FSDP2's Shard(0): each rank wrote its own rows
            assert [p["file"] for p in entry["pieces"]] == [shard_file_name(0, 2), shard_file_name(1, 2)], name
            assert sum(p["shape"][0] for p in entry["pieces"]) == entry["shape"][0], name
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    persisted_weights = ranks[0]["weights"]
    state = model.state_dict()
    assert max_abs_diff({k: state[k] for k in state}, {k: persisted_weights[f"model.{k}"] for k in state}) == 0.0
    fresh = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, local_files_only=True, dtype=torch.float32)
    load_weights_into(fresh, path)  # the policy's loader skips the rank files
    assert max_abs_diff(fresh.state_dict(), state) == 0.0


# (a checkpoint persisted whole by one process resuming at 2 fsdp ranks, and LoRA at 2 ranks, pass too:
# 64 s more, left out to keep this file near 90 s on 2 cores)
@pytest.mark.parametrize("extra,written,world", [("gae", 2, 1), ("gae", 2, 4), ("lora", 2, 1)])
def test_a_checkpoint_resumes_at_another_rank_count(persisted, tiny_lm_dir, extra, written, world):
    root, options, before = persisted(extra, written)
    out = root / f"resume-{world}"
    ranks = run_ranks(world, tiny_lm_dir, out, {**options, "parallelism": "fsdp", "task": "resume"})
    optimizer = load_file(str(root / "persist" / "rank0-optimizer.safetensors"))
    following = load_file(str(root / "persist" / "rank0-next.safetensors"))
    assert any(name.endswith("exp_avg_sq") for name in optimizer)
    if extra == "gae":
        assert any(name.startswith("value_head.") for name in before[0]["weights"])
    for rank in range(world):
        weights = max_abs_diff(load_file(str(out / f"rank{rank}-resumed.safetensors")), before[0]["weights"])
        moments = max_abs_diff(load_file(str(out / f"rank{rank}-optimizer-resumed.safetensors")), optimizer)
        next_update = max_abs_diff(ranks[rank]["weights"], following)
        print(
            f"{extra} written at {written}, resumed at {world}, rank {rank}: weights {weights:.1e}, AdamW "
            f"{moments:.1e}, next update {next_update:.1e}"
        )
        assert weights == 0.0 and moments == 0.0
        assert next_update < TOLERANCE and ranks[rank]["moved"] > 1e-4
    if world > 1:  # each fsdp rank read only its rows of the weights (model.safetensors), never the whole file
        assert_each_rank_read_its_rows(root / "checkpoints" / "v000001", out, world)
    assert not (root / "unpickled").exists()
    assert pathlib.Path(options["checkpoint_dir"], "v000001").is_dir()


def assert_each_rank_read_its_rows(version: pathlib.Path, out: pathlib.Path, world: int) -> None:
    """The bytes each rank read from the checkpoint's weight files (the worker counts them through
    gathering.safe_open) are exactly those of its rows: FSDP2's Shard(0), cut as torch.chunk cuts
    (a rank past the last chunk holds none)."""
    for file in weight_files(version):
        whole = load_file(str(file))
        total = sum(tensor.numel() * tensor.element_size() for tensor in whole.values())
        for rank in range(world):
            chunks = [torch.chunk(tensor, world, dim=0) for tensor in whole.values()]
            rows = sum(c[rank].numel() * c[rank].element_size() for c in chunks if rank < len(c))
            read = json.loads((out / f"rank{rank}-weight-reads.json").read_text()).get(file.name)
            print(f"rank {rank} of {world} read {read} bytes of {file.name}'s {total} ({rows / total:.3f} of it)")
            assert read == rows
            assert rows <= total / world * 1.2  # a quarter of the file at 4 ranks, give or take a chunk's rounding


def test_reading_weight_rows_refuses_a_misfit_before_copying_anything(tiny_lm_dir, tmp_path):
    """gathering.load_weight_rows (one process: every row) loads a model directory exactly, and refuses a
    file lacking a weight, holding a stranger or a wrong shape, naming it, with the weights unchanged."""
    trainer = build_trainer(str(tiny_lm_dir), str(tmp_path / "checkpoints"), {}, None)
    whole = load_file(str(tiny_lm_dir / "model.safetensors"))
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.zero_()
    assert gathering.load_weight_rows(trainer, tiny_lm_dir) == sum(t.numel() * t.element_size() for t in whole.values())
    state = trainer.model.state_dict()
    assert max_abs_diff({k: state[k] for k in whole}, whole) == 0.0
    lacking = {k: v for k, v in whole.items() if k != "model.norm.weight"}
    for number, (tensors, message) in enumerate(
        [
            (lacking, "lacks 1 of the model's weights: ['model.norm.weight']"),
            ({**whole, "model.stranger": torch.ones(2)}, "holds model.stranger, which the trainer's model has no"),
            ({**whole, "model.norm.weight": torch.ones(5)}, "model.norm.weight has shape (5,), the trainer"),
        ]
    ):
        directory = tmp_path / f"misfit{number}"
        directory.mkdir()
        save_file({k: v + 1 for k, v in tensors.items()}, str(directory / "model.safetensors"))
        with pytest.raises(ValueError, match=re.escape(message)):
            gathering.load_weight_rows(trainer, directory)
        assert max_abs_diff({k: state[k] for k in whole}, whole) == 0.0  # nothing copied
