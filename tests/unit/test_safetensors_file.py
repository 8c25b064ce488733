"""The direct safetensors writer (services/common/safetensors_file.py): what it writes is a standard
safetensors file, read back by safetensors' own loaders, written afresh or over a preallocated file."""

from __future__ import annotations

import json
import os
import pathlib
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from services.common.checkpoints import checkpoint_problem, write_checkpoint, write_weights
from services.common.safetensors_file import layout, preallocate, write_safetensors


def mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w.float32": torch.randn(7, 5, generator=generator),
        "w.bfloat16": torch.randn(3, 4, generator=generator).to(torch.bfloat16),
        "w.float16": torch.randn(9, generator=generator).half(),
        "ids.int64": torch.arange(6).reshape(2, 3),
        "mask.bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 6, generator=generator).t(),  # not contiguous
        "scalar": torch.tensor(2.5),
    }


def assert_reads_back(path: pathlib.Path, tensors: dict[str, torch.Tensor], metadata: dict | None) -> None:
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == metadata


def test_a_fresh_file_is_standard_safetensors(tmp_path):
    tensors = mixed_tensors()
    written = write_safetensors(tmp_path / "w.safetensors", tensors, {"format": "pt"})
    assert written == (tmp_path / "w.safetensors").stat().st_size
    assert_reads_back(tmp_path / "w.safetensors", tensors, {"format": "pt"})


def test_the_header_is_padded_to_eight_bytes_and_offsets_follow_each_other(tmp_path):
    tensors = mixed_tensors()
    head, total = layout(tensors, {"format": "pt"})
    (length,) = struct.unpack("<Q", head[:8])
    assert length % 8 == 0 and len(head) == 8 + length
    header = json.loads(head[8:])
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert total == 8 + length + data_bytes
    ends = [header[name]["data_offsets"] for name in tensors]
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[-1][1] == data_bytes


def test_written_over_a_preallocated_file_of_its_size_in_place(tmp_path):
    tensors = mixed_tensors()
    _, total = layout(tensors, {"format": "pt"})
    spare = preallocate(tmp_path / "spare", total)
    inode = spare.stat().st_ino
    write_safetensors(tmp_path / "w.safetensors", tensors, {"format": "pt"}, into=spare)
    assert not spare.exists() and (tmp_path / "w.safetensors").stat().st_ino == inode
    assert_reads_back(tmp_path / "w.safetensors", tensors, {"format": "pt"})


@pytest.mark.parametrize("extra", [-8, 8])
def test_a_preallocated_file_of_another_size_is_dropped_and_the_file_written_afresh(tmp_path, extra):
    tensors = mixed_tensors()
    _, total = layout(tensors, None)
    spare = preallocate(tmp_path / "spare", total + extra)
    write_safetensors(tmp_path / "w.safetensors", tensors, into=spare)
    assert not spare.exists() and (tmp_path / "w.safetensors").stat().st_size == total
    assert_reads_back(tmp_path / "w.safetensors", tensors, None)


def test_a_dtype_safetensors_cannot_store_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="'c' has dtype torch.complex64"):
        write_safetensors(tmp_path / "w.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


def test_published_weights_carry_sizes_without_checksums_and_say_so_when_fully_checked(tmp_path):
    tensors = mixed_tensors()
    published = write_checkpoint(tmp_path, 1, lambda d: write_weights(d, tensors), durable=False)
    persisted = write_checkpoint(tmp_path / "persisted", 1, lambda d: write_weights(d, tensors))
    assert checkpoint_problem(published, full=False) is None and checkpoint_problem(persisted) is None
    assert "no checksum" in checkpoint_problem(published, full=True)
    os.truncate(published / "model.safetensors", 16)  # torn: the sizes still catch it
    assert "half-written" in checkpoint_problem(published, full=False)


def test_the_file_transport_writes_each_version_into_the_file_it_allocated_during_the_update(tmp_path):
    from services.trainer.publishing import FileTransport

    transport = FileTransport(tmp_path / "publish", lora_config=None)
    spare = tmp_path / "publish" / FileTransport.PREALLOCATED
    first = {name: tensor for name, tensor in mixed_tensors().items() if name != "scalar"}
    location, moved = transport.send(1, first)
    assert transport.preallocating is None and not spare.exists()  # not while the policy swaps to v1
    transport.prepare()  # as the next update begins
    transport.preallocating.join()
    assert spare.stat().st_size == moved == (pathlib.Path(location) / "model.safetensors").stat().st_size
    inode = spare.stat().st_ino
    second = {name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in first.items()}
    location, _ = transport.send(2, second)
    assert (pathlib.Path(location) / "model.safetensors").stat().st_ino == inode
    assert_reads_back(pathlib.Path(location) / "model.safetensors", second, {"format": "pt"})
    assert checkpoint_problem(location, full=False) is None
    transport.close(remove=False)
    assert not spare.exists() and pathlib.Path(location).is_dir()
