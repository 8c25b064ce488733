"""Weight buckets: a manifest of tensors laid out in flat same-dtype buffers of about a given size.

The `broadcast` and `cuda_ipc` transports move weights as a few large flat buffers instead of one
message per tensor (hundreds of small collectives cost far more than a few big ones). Only the
manifest (every tensor's name, shape and dtype, in the sender's order) travels with the request;
both ends compute the same layout from it, so the buffers travel bare.

Layout rule (bucket_layout): tensors are grouped by dtype, dtypes in order of first appearance,
manifest order kept within a dtype; each group is cut greedily: a tensor joins the open bucket
unless that would take the bucket past bucket_bytes while it already holds something, so a tensor
larger than a bucket travels alone in one of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

# The dtypes a manifest may name (torch's names without "torch."); nothing else is ever built from one.
DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}


def dtype_named(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one a weight manifest may carry; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    dtype_named(name)  # refuses what the other end could not rebuild
    return name


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_named(self.dtype).itemsize


@dataclass(frozen=True)
class Bucket:
    """One flat buffer: `specs[i]` occupies elements offsets[i] : offsets[i] + specs[i].numel."""

    dtype: str
    specs: tuple[TensorSpec, ...]
    offsets: tuple[int, ...]
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_named(self.dtype).itemsize


def manifest_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The manifest of named tensors, in their order."""
    return [TensorSpec(name, tuple(tensor.shape), dtype_name(tensor.dtype)) for name, tensor in tensors.items()]


def checked_manifest(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """A received manifest, refused (ValueError naming the fault) unless every name is unique, every
    dtype known and every size non-negative."""
    specs, seen = list(specs), set()
    if not specs:
        raise ValueError("the manifest names no tensors")
    for spec in specs:
        if not spec.name or spec.name in seen:
            raise ValueError(f"the manifest names tensor {spec.name!r} twice or not at all")
        seen.add(spec.name)
        if any(size < 0 for size in spec.shape):
            raise ValueError(f"tensor {spec.name!r} has a negative size in shape {list(spec.shape)}")
        dtype_named(spec.dtype)
    return specs


def bucket_layout(specs: list[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """The buckets both ends use for this manifest (the rule is in the module docstring)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    by_dtype: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        by_dtype.setdefault(spec.dtype, []).append(spec)
    buckets = []
    for dtype, group in by_dtype.items():
        members: list[TensorSpec] = []
        offsets: list[int] = []
        filled = 0
        for spec in group:
            if members and (filled + spec.numel) * dtype_named(dtype).itemsize > bucket_bytes:
                buckets.append(Bucket(dtype, tuple(members), tuple(offsets), filled))
                members, offsets, filled = [], [], 0
            members.append(spec)
            offsets.append(filled)
            filled += spec.numel
        if members:
            buckets.append(Bucket(dtype, tuple(members), tuple(offsets), filled))
    return buckets


def flatten_bucket(
    bucket: Bucket, tensors: Mapping[str, torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The bucket's tensors copied back to back into one flat buffer (numel,), on their device."""
    first = tensors[bucket.specs[0].name]
    if out is None:
        out = torch.empty(bucket.numel, dtype=dtype_named(bucket.dtype), device=first.device)
    with torch.no_grad():
        for spec, offset in zip(bucket.specs, bucket.offsets):
            out[offset : offset + spec.numel].copy_(tensors[spec.name].reshape(-1))
    return out


def unflatten_bucket(bucket: Bucket, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views into a received flat buffer (numel,), one per tensor, shaped as the manifest says."""
    if buffer.numel() != bucket.numel:
        raise ValueError(f"a bucket of {bucket.numel} elements received {buffer.numel()}")
    return {
        spec.name: buffer[offset : offset + spec.numel].view(spec.shape)
        for spec, offset in zip(bucket.specs, bucket.offsets)
    }


def specs_to_messages(specs: list[TensorSpec], message_class) -> list:
    return [message_class(name=s.name, shape=list(s.shape), dtype=s.dtype) for s in specs]


def specs_from_messages(messages) -> list[TensorSpec]:
    return checked_manifest(TensorSpec(m.name, tuple(int(size) for size in m.shape), m.dtype) for m in messages)
