"""Bucket layout: both ends compute it from the manifest alone, so it is checked against an
independent computation, a worked example, and a flatten/unflatten round trip."""

from __future__ import annotations

import random

import pytest
import torch

from belay.v1 import belay_pb2
from services.common.weight_buckets import (
    TensorSpec,
    bucket_layout,
    checked_manifest,
    flatten_bucket,
    manifest_of,
    specs_from_messages,
    specs_to_messages,
    unflatten_bucket,
)

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}


def independent_layout(specs, bucket_bytes):
    """The rule restated: per dtype (first-appearance order) a running byte total; a tensor opens a
    new bucket when the open one is non-empty and would pass bucket_bytes. Returns names per bucket."""
    dtypes = list(dict.fromkeys(s.dtype for s in specs))
    result = []
    for dtype in dtypes:
        current, total = [], 0
        for spec in (s for s in specs if s.dtype == dtype):
            size = ITEMSIZE[dtype]
            for dim in spec.shape:
                size *= dim
            if current and total + size > bucket_bytes:
                result.append(current)
                current, total = [], 0
            current.append(spec.name)
            total += size
        if current:
            result.append(current)
    return result


def test_worked_example():
    specs = [
        TensorSpec("a", (10,), "float32"),
        TensorSpec("b", (4, 4), "bfloat16"),
        TensorSpec("c", (5,), "float32"),
        TensorSpec("d", (100,), "float32"),
        TensorSpec("e", (1,), "float32"),
    ]
    buckets = bucket_layout(specs, bucket_bytes=64)  # 16 float32 per bucket
    assert [[s.name for s in b.specs] for b in buckets] == [["a", "c"], ["d"], ["e"], ["b"]]
    assert [b.offsets for b in buckets] == [(0, 10), (0,), (0,), (0,)]
    assert [b.numel for b in buckets] == [15, 100, 1, 16]
    assert [b.dtype for b in buckets] == ["float32", "float32", "float32", "bfloat16"]


@pytest.mark.parametrize("seed", range(20))
def test_layout_matches_an_independent_computation(seed):
    rng = random.Random(seed)
    specs = [
        TensorSpec(f"t{i}", tuple(rng.randint(1, 9) for _ in range(rng.randint(0, 3))), rng.choice(list(ITEMSIZE)))
        for i in range(rng.randint(1, 30))
    ]
    bucket_bytes = rng.choice([1, 16, 100, 1000, 10**6])
    buckets = bucket_layout(specs, bucket_bytes)
    assert [[s.name for s in b.specs] for b in buckets] == independent_layout(specs, bucket_bytes)
    for bucket in buckets:  # contiguous offsets; over the size only when alone
        assert list(bucket.offsets) == [sum(s.numel for s in bucket.specs[:i]) for i in range(len(bucket.specs))]
        assert bucket.numel == sum(s.numel for s in bucket.specs)
        assert bucket.nbytes <= bucket_bytes or len(bucket.specs) == 1


def test_flatten_then_unflatten_gives_the_tensors_back():
    torch.manual_seed(0)
    tensors = {
        "w": torch.randn(3, 4),
        "h": torch.randn(5).to(torch.bfloat16),
        "b": torch.randn(2, 2, 2),
        "s": torch.tensor(1.5),
    }
    specs = manifest_of(tensors)
    assert [s.shape for s in specs] == [(3, 4), (5,), (2, 2, 2), ()]
    received = {}
    for bucket in bucket_layout(specs, bucket_bytes=48):
        flat = flatten_bucket(bucket, tensors)
        assert torch.equal(flat, torch.cat([tensors[s.name].reshape(-1) for s in bucket.specs]))
        received.update(unflatten_bucket(bucket, flat.clone()))
    assert received.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor)


def test_manifest_round_trips_through_the_request_and_bad_ones_are_refused():
    specs = [TensorSpec("x", (2, 3), "float32"), TensorSpec("y", (), "bfloat16")]
    request = belay_pb2.UpdateWeightsRequest(manifest=specs_to_messages(specs, belay_pb2.TensorSpec))
    assert specs_from_messages(belay_pb2.UpdateWeightsRequest.FromString(request.SerializeToString()).manifest) == specs
    with pytest.raises(ValueError, match="twice"):
        checked_manifest([specs[0], specs[0]])
    with pytest.raises(ValueError, match="'complex_thing' is not one"):
        checked_manifest([TensorSpec("z", (1,), "complex_thing")])
    with pytest.raises(ValueError, match="negative"):
        checked_manifest([TensorSpec("z", (-1,), "float32")])
    with pytest.raises(ValueError, match="no tensors"):
        checked_manifest([])
