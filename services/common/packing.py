"""Ragged batches of token ids / log-probabilities <-> the packed arrays of belay.v1."""

from __future__ import annotations

import numpy as np

from belay.v1 import belay_pb2


class PackingError(ValueError):
    """A packed array whose bytes do not match its declared lengths."""


def pack_int32(rows: list[list[int]] | list[np.ndarray]) -> belay_pb2.PackedInt32:
    lengths = [len(row) for row in rows]
    data = np.concatenate([np.asarray(row, dtype="<i4") for row in rows]) if rows else np.zeros(0, "<i4")
    return belay_pb2.PackedInt32(data=data.astype("<i4").tobytes(), lengths=lengths)


def pack_float32(rows: list[list[float]] | list[np.ndarray]) -> belay_pb2.PackedFloat32:
    lengths = [len(row) for row in rows]
    data = np.concatenate([np.asarray(row, dtype="<f4") for row in rows]) if rows else np.zeros(0, "<f4")
    return belay_pb2.PackedFloat32(data=data.astype("<f4").tobytes(), lengths=lengths)


def _unpack(message, dtype: str, name: str) -> list[np.ndarray]:
    if len(message.data) % 4:
        raise PackingError(f"{name}: {len(message.data)} bytes is not a whole number of 4-byte values")
    flat = np.frombuffer(message.data, dtype=dtype)
    lengths = list(message.lengths)
    if any(length < 0 for length in lengths):
        raise PackingError(f"{name}: negative row length in {lengths}")
    if sum(lengths) != flat.size:
        raise PackingError(f"{name}: lengths add up to {sum(lengths)} values but data holds {flat.size}")
    bounds = np.cumsum([0, *lengths])
    return [flat[bounds[i] : bounds[i + 1]] for i in range(len(lengths))]


def unpack_int32(message: belay_pb2.PackedInt32, name: str = "ids") -> list[np.ndarray]:
    return _unpack(message, "<i4", name)


def unpack_float32(message: belay_pb2.PackedFloat32, name: str = "values") -> list[np.ndarray]:
    return _unpack(message, "<f4", name)
