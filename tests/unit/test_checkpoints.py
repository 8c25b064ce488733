"""Checkpoint writing and reading (services/common/checkpoints.py): atomic commits, pruning,
weights loaded in place with refusal of misfits, optimizer and trainer state round trips."""

from __future__ import annotations

import ast
import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from services.common import checkpoints
from services.common.checkpoints import (
    committed_versions,
    latest_checkpoint,
    load_trainer_state,
    load_weights_into,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    prune_checkpoints,
    save_trainer_state,
    version_dir_name,
    write_checkpoint,
)
from tests.pickle_trap import trap_bytes

SERVICES = pathlib.Path(__file__).resolve().parents[2] / "services"


def write_marker(text: str):
    def write_files(directory: pathlib.Path) -> None:
        (directory / "weights.txt").write_text(text)
        (directory / "sub").mkdir()
        (directory / "sub" / "nested.txt").write_text(text * 2)

    return write_files


def entries(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# --- atomic commit ----------------------------------------------------------------------------


def test_version_dir_name_is_zero_padded_to_six_digits():
    assert version_dir_name(7) == "v000007"
    assert version_dir_name(123456) == "v123456"


def test_write_checkpoint_commits_every_file_under_the_version_dir(tmp_path):
    root = tmp_path / "ckpt"
    final = write_checkpoint(root, 3, write_marker("three"))
    assert final == root / "v000003"
    assert (final / "weights.txt").read_text() == "three"
    assert (final / "sub" / "nested.txt").read_text() == "threethree"
    assert entries(root) == ["v000003"]  # no temp dir left behind


def test_write_files_sees_a_temp_dir_not_the_final_one(tmp_path):
    seen = []

    def write_files(directory: pathlib.Path) -> None:
        seen.append(directory)
        assert not (tmp_path / "v000001").exists()
        (directory / "x").write_text("x")

    write_checkpoint(tmp_path, 1, write_files)
    assert seen[0].name.startswith(".tmp-")
    assert seen[0].parent == tmp_path
    assert not seen[0].exists()


def test_failing_write_leaves_no_version_dir_and_no_temp_dir(tmp_path):
    root = tmp_path / "ckpt"

    def write_files(directory: pathlib.Path) -> None:
        (directory / "half.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(root, 5, write_files)
    assert entries(root) == []
    assert committed_versions(root) == []


def test_interrupted_write_leaves_no_trace(tmp_path):
    def write_files(directory: pathlib.Path) -> None:
        (directory / "a").write_text("a")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 1, write_files)
    assert entries(tmp_path) == []


def test_existing_version_is_never_overwritten(tmp_path):
    write_checkpoint(tmp_path, 2, write_marker("first"))
    called = []

    def write_files(directory: pathlib.Path) -> None:
        called.append(directory)
        (directory / "weights.txt").write_text("second")

    with pytest.raises(FileExistsError, match="never overwritten"):
        write_checkpoint(tmp_path, 2, write_files)
    assert called == []
    assert (tmp_path / "v000002" / "weights.txt").read_text() == "first"
    assert entries(tmp_path) == ["v000002"]


def test_committed_versions_ignores_temp_dirs_files_and_other_names(tmp_path):
    write_checkpoint(tmp_path, 10, write_marker("ten"))
    write_checkpoint(tmp_path, 2, write_marker("two"))
    (tmp_path / ".tmp-v000011-999").mkdir()  # a writer died mid-write
    (tmp_path / "v000012").write_text("not a dir")  # a file with a version-like name
    (tmp_path / "v12").mkdir()  # wrong width
    (tmp_path / "latest").mkdir()
    assert committed_versions(tmp_path) == [(2, tmp_path / "v000002"), (10, tmp_path / "v000010")]
    assert latest_checkpoint(tmp_path) == (10, tmp_path / "v000010")


def test_no_root_means_no_versions(tmp_path):
    assert committed_versions(tmp_path / "absent") == []
    assert latest_checkpoint(tmp_path / "absent") is None


def test_prune_keeps_the_newest_n(tmp_path):
    for version in [1, 2, 3, 4, 5]:
        write_checkpoint(tmp_path, version, write_marker(str(version)))
    (tmp_path / ".tmp-v000006-1").mkdir()
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(removed) == [tmp_path / "v000001", tmp_path / "v000002", tmp_path / "v000003"]
    assert [v for v, _ in committed_versions(tmp_path)] == [4, 5]
    assert (tmp_path / "v000005" / "weights.txt").read_text() == "5"
    assert prune_checkpoints(tmp_path, keep=2) == []  # nothing more to do


def test_prune_with_fewer_versions_than_keep_removes_nothing(tmp_path):
    write_checkpoint(tmp_path, 1, write_marker("1"))
    assert prune_checkpoints(tmp_path, keep=3) == []
    assert [v for v, _ in committed_versions(tmp_path)] == [1]


# --- weights ----------------------------------------------------------------------------------


def tiny_config(tiny_lm_dir) -> LlamaConfig:
    return LlamaConfig.from_pretrained(tiny_lm_dir)


def fresh_model(tiny_lm_dir, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(tiny_lm_dir)).eval()


def logits_of(model, ids=((1, 5, 9, 22, 40, 7),)) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def saved_weights(tiny_lm_dir) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(pathlib.Path(tiny_lm_dir).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def checkpoint_with(tmp_path: pathlib.Path, state: dict[str, torch.Tensor]) -> pathlib.Path:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def test_load_weights_into_makes_a_differently_initialised_model_equal(tiny_lm_dir):
    saved = LlamaForCausalLM.from_pretrained(tiny_lm_dir, use_safetensors=True, dtype=torch.float32).eval()
    other = fresh_model(tiny_lm_dir, seed=123)
    assert not torch.allclose(logits_of(saved), logits_of(other))
    load_weights_into(other, tiny_lm_dir)
    assert torch.equal(logits_of(saved), logits_of(other))
    for name, tensor in saved.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name


def test_load_weights_into_keeps_tied_head_tied(tiny_lm_dir):
    other = fresh_model(tiny_lm_dir, seed=5)
    assert "lm_head.weight" not in saved_weights(tiny_lm_dir)  # tied: the file stores it once
    load_weights_into(other, tiny_lm_dir)
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()
    assert torch.equal(other.lm_head.weight, saved_weights(tiny_lm_dir)["model.embed_tokens.weight"])


def test_load_weights_into_refuses_a_wrong_shape_without_changing_any_weight(tiny_lm_dir, tmp_path):
    state = saved_weights(tiny_lm_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = torch.zeros(state[name].shape[0], state[name].shape[1] + 1)
    checkpoint = checkpoint_with(tmp_path, state)
    model = fresh_model(tiny_lm_dir, seed=7)
    before = snapshot(model)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_weights_into(model, checkpoint)
    assert_unchanged(model, before)


def test_load_weights_into_refuses_an_unexpected_key_without_changing_any_weight(tiny_lm_dir, tmp_path):
    state = saved_weights(tiny_lm_dir)
    state["model.value_head.weight"] = torch.ones(1, 32)
    checkpoint = checkpoint_with(tmp_path, state)
    model = fresh_model(tiny_lm_dir, seed=7)
    before = snapshot(model)
    with pytest.raises(ValueError, match="unexpected keys.*model.value_head.weight"):
        load_weights_into(model, checkpoint)
    assert_unchanged(model, before)


def test_load_weights_into_refuses_a_missing_untied_key(tiny_lm_dir, tmp_path):
    state = saved_weights(tiny_lm_dir)
    del state["model.norm.weight"]
    checkpoint = checkpoint_with(tmp_path, state)
    model = fresh_model(tiny_lm_dir, seed=7)
    before = snapshot(model)
    with pytest.raises(ValueError, match="missing keys.*model.norm.weight"):
        load_weights_into(model, checkpoint)
    assert_unchanged(model, before)


def test_load_weights_into_refuses_a_dir_without_model_safetensors(tmp_path, tiny_lm_dir):
    save_trainer_state(tmp_path, {"x": torch.zeros(2)}, {"step": 1})  # only trainer state: not weights
    with pytest.raises(FileNotFoundError, match="no model"):
        load_weights_into(fresh_model(tiny_lm_dir, seed=1), tmp_path)


def test_load_weights_never_unpickles(tiny_lm_dir, tmp_path):
    """A pickle next to the safetensors would run code if unpickled; it must be left alone."""
    marker = tmp_path / "pwned"
    checkpoint = checkpoint_with(tmp_path, saved_weights(tiny_lm_dir))
    (checkpoint / "pytorch_model.bin").write_bytes(trap_bytes(marker))
    (checkpoint / "optimizer.pt").write_bytes(trap_bytes(marker))
    save_trainer_state(checkpoint, {"x": torch.zeros(1)}, {"step": 0})
    load_weights_into(fresh_model(tiny_lm_dir, seed=2), checkpoint)
    load_trainer_state(checkpoint)
    assert not marker.exists()


def test_checkpoint_code_never_calls_torch_load_or_pickle():
    tree = ast.parse(pathlib.Path(checkpoints.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in {"pickle", "cPickle", "dill", "joblib"} for n in names), names
        if isinstance(node, ast.Attribute) and node.attr == "load":
            assert not (isinstance(node.value, ast.Name) and node.value.id in {"torch", "pickle"}), ast.unparse(node)


def test_no_service_calls_torch_load_or_unpickles():
    for source in sorted(SERVICES.rglob("*.py")):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert "pickle" not in {n.split(".")[0] for n in names}, source
            if isinstance(node, ast.Attribute) and node.attr in {"load", "loads"}:
                assert not (isinstance(node.value, ast.Name) and node.value.id in {"torch", "pickle"}), (
                    f"{source}: {ast.unparse(node)}"
                )


# --- optimizer and trainer state ----------------------------------------------------------------


def make_model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    return model, optimizer


def train_steps(model, optimizer, steps: int, offset: int) -> None:
    for step in range(steps):
        generator = torch.Generator().manual_seed(offset + step)
        x = torch.randn(16, 4, generator=generator)
        y = torch.randn(16, 2, generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_adamw_state_round_trips_and_training_continues_bit_for_bit(tmp_path):
    model, optimizer = make_model_and_optimizer()
    train_steps(model, optimizer, steps=2, offset=0)

    tensors, rest = optimizer_state_to_flat(optimizer.state_dict())
    assert tensors and all(key.startswith("state/") for key in tensors)
    weights = {f"model/{k}": v for k, v in model.state_dict().items()}
    save_trainer_state(tmp_path, {**tensors, **weights}, {"optimizer": rest, "step": 2})
    loaded_tensors, meta = load_trainer_state(tmp_path)
    assert meta["step"] == 2

    restored_model, restored_optimizer = make_model_and_optimizer(seed=99)  # different init
    restored_model.load_state_dict({k[len("model/") :]: v for k, v in loaded_tensors.items() if k.startswith("model/")})
    restored_optimizer.load_state_dict(
        optimizer_state_from_flat(
            {k: v for k, v in loaded_tensors.items() if k.startswith("state/")}, meta["optimizer"]
        )
    )

    original_state, restored_state = optimizer.state_dict(), restored_optimizer.state_dict()
    assert original_state["state"].keys() == restored_state["state"].keys()
    for index, values in original_state["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(restored_state["state"][index][name]), torch.as_tensor(value)), name
    assert restored_optimizer.param_groups[0]["lr"] == 1e-2
    assert tuple(restored_optimizer.param_groups[0]["betas"]) == (0.8, 0.95)

    train_steps(model, optimizer, steps=3, offset=100)
    train_steps(restored_model, restored_optimizer, steps=3, offset=100)
    for (name, a), b in zip(model.state_dict().items(), restored_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_restarting_the_optimizer_from_scratch_would_diverge(tmp_path):
    """Control for the bit-for-bit test: without the moments the continuation differs."""
    model, optimizer = make_model_and_optimizer()
    train_steps(model, optimizer, steps=2, offset=0)
    fresh_model_, fresh_optimizer = make_model_and_optimizer(seed=99)
    fresh_model_.load_state_dict(model.state_dict())
    train_steps(model, optimizer, steps=3, offset=100)
    train_steps(fresh_model_, fresh_optimizer, steps=3, offset=100)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh_model_.state_dict().values()))


def test_optimizer_flat_state_keeps_non_tensor_values_as_json():
    state_dict = {
        "state": {0: {"exp_avg": torch.ones(2), "step": 3}, 1: {"count": 7}},
        "param_groups": [{"lr": 0.1, "params": [0, 1]}],
    }
    tensors, rest = optimizer_state_to_flat(state_dict)
    assert set(tensors) == {"state/0/exp_avg"}
    rest = json.loads(json.dumps(rest))  # must survive JSON
    back = optimizer_state_from_flat(tensors, rest)
    assert back["param_groups"] == [{"lr": 0.1, "params": [0, 1]}]
    assert set(back["state"]) == {0, 1}
    assert torch.equal(back["state"][0]["exp_avg"], torch.ones(2))
    assert back["state"][0]["step"] == 3
    assert back["state"][1] == {"count": 7}


def test_trainer_state_round_trip(tmp_path):
    tensors = {
        "rng/torch": torch.arange(10, dtype=torch.uint8),
        "scale": torch.tensor(2.5),
        "moments": torch.randn(3, 4),
    }
    meta = {"step": 17, "version": 4, "consumed": ["1-0", "2-0"], "kl_coef": 0.05, "nested": {"a": [1, 2]}}
    save_trainer_state(tmp_path, tensors, meta)
    assert (tmp_path / checkpoints.STATE_TENSORS).is_file()
    assert (tmp_path / checkpoints.STATE_JSON).is_file()
    loaded_tensors, loaded_meta = load_trainer_state(str(tmp_path))
    assert loaded_meta == meta
    assert loaded_tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded_tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded_tensors[name], tensor), name


def test_trainer_state_inside_an_atomic_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path, 1, lambda d: save_trainer_state(d, {"w": torch.ones(2)}, {"step": 1}))
    tensors, meta = load_trainer_state(path)
    assert meta == {"step": 1}
    assert torch.equal(tensors["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["v000001"]


def test_remove_unfinished_deletes_only_temp_dirs_of_killed_writers(tmp_path):
    from services.common.checkpoints import remove_unfinished

    write_checkpoint(tmp_path, 1, lambda d: (d / "f").write_text("x"))
    (tmp_path / ".tmp-v000002-999").mkdir()
    (tmp_path / ".tmp-v000002-999" / "model.safetensors").write_text("half")
    removed = remove_unfinished(tmp_path)
    assert [p.name for p in removed] == [".tmp-v000002-999"]
    assert [v for v, _ in committed_versions(tmp_path)] == [1]
    assert not (tmp_path / ".tmp-v000002-999").exists()


def test_a_half_written_or_corrupt_checkpoint_is_detected_and_skipped_with_a_log_line(tmp_path, caplog):
    import logging

    from services.common.checkpoints import checkpoint_problem, latest_valid_checkpoint

    def files(d):
        (d / "model.safetensors").write_bytes(b"x" * 1000)
        (d / "config.json").write_text("{}")

    v1 = write_checkpoint(tmp_path, 1, files)
    v2 = write_checkpoint(tmp_path, 2, files)
    v3 = write_checkpoint(tmp_path, 3, files)
    assert checkpoint_problem(v3) is None
    with open(v3 / "model.safetensors", "r+b") as handle:  # same size, one byte flipped
        handle.seek(500)
        handle.write(b"y")
    (v2 / "model.safetensors").write_bytes(b"x" * 10)  # truncated
    assert "xxh3_128 checksum" in checkpoint_problem(v3) and checkpoint_problem(v3, full=False) is None
    assert "half-written" in checkpoint_problem(v2) and "half-written" in checkpoint_problem(v2, full=False)
    log = logging.getLogger("test")
    with caplog.at_level(logging.ERROR, logger="test"):
        assert latest_valid_checkpoint(tmp_path, log) == (1, v1)
    assert "v000003" in caplog.text and "corrupt" in caplog.text and "v000002" in caplog.text
    (v1 / "MANIFEST.json").unlink()
    assert "MANIFEST" in checkpoint_problem(v1) and latest_valid_checkpoint(tmp_path) is None


def test_manifest_checksums_are_xxh3_and_older_sha256_manifests_still_verify(tmp_path):
    import hashlib
    import json

    import xxhash

    from services.common.checkpoints import MANIFEST, checkpoint_problem

    payload = bytes(range(256)) * 4000
    path = write_checkpoint(tmp_path, 1, lambda d: (d / "model.safetensors").write_bytes(payload))
    entry = json.loads((path / MANIFEST).read_text())["files"]["model.safetensors"]
    assert entry == {"size": len(payload), "xxh3_128": xxhash.xxh3_128(payload).hexdigest()}
    # a manifest from before the switch: sha256 per file
    (path / MANIFEST).write_text(
        json.dumps(
            {
                "version": 1,
                "files": {"model.safetensors": {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}},
            }
        )
    )
    assert checkpoint_problem(path) is None
    (path / "model.safetensors").write_bytes(payload[:-1] + b"?")
    assert "sha256 checksum (corrupt)" in checkpoint_problem(path)


def test_load_weights_into_skips_the_trainer_state_and_the_rank_shards(tiny_lm_dir, tmp_path):
    """A checkpoint persisted under fsdp holds trainer_state.rankRRRRR-of-WWWWW.safetensors beside the weights:
    tensors no model has (optimizer/state/...), which a loader globbing *.safetensors would refuse."""
    directory = checkpoint_with(tmp_path, saved_weights(tiny_lm_dir))
    for name in ("trainer_state.safetensors", "trainer_state.rank00000-of-00002.safetensors"):
        save_file({"optimizer/state/0/exp_avg": torch.ones(3)}, str(directory / name))
    assert [p.name for p in checkpoints.weight_files(directory)] == ["model.safetensors"]
    other = fresh_model(tiny_lm_dir, seed=5)
    load_weights_into(other, directory)
    assert_unchanged(other, LlamaForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).state_dict())


def test_a_started_write_keeps_what_other_ranks_wrote_into_the_temp_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.tmp-v000003-\d+ should hold the files the other ranks wrote"):
        write_checkpoint(tmp_path, 3, write_marker("x"), started=True)
    temp = checkpoints.temp_dir(tmp_path, 3, owner=os.getpid())
    assert temp == checkpoints.temp_dir(tmp_path, 3)
    temp.mkdir()
    (temp / "trainer_state.rank00001-of-00002.safetensors").write_bytes(b"rank 1")
    final = write_checkpoint(tmp_path, 3, write_marker("x"), started=True)
    assert (final / "trainer_state.rank00001-of-00002.safetensors").read_bytes() == b"rank 1"
    assert "trainer_state.rank00001-of-00002.safetensors" in json.loads((final / "MANIFEST.json").read_text())["files"]
    assert entries(tmp_path) == ["v000003"]
