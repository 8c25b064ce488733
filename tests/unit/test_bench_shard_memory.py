"""services/bench/shard_memory.py at one rank, in process: the bytes it counts are the single-rank
trainer's, 4 bytes a float32 value: parameters once, gradients once, AdamW's two moments plus one step
counter per parameter. (The sharded figures are for reading: the bench prints them.)"""

from __future__ import annotations

from services.bench.shard_memory import build_model, measure, table


def test_one_rank_holds_every_parameter_gradient_and_both_moments():
    (found,) = measure("tiny", 1)
    tensors = list(build_model("tiny").parameters())
    values = sum(p.numel() for p in tensors)
    assert found == {"parameters": 4 * values, "gradients": 4 * values, "optimizer": 8 * values + 4 * len(tensors)}


def test_the_table_compares_each_rank_count_with_one_rank():
    one = {"parameters": 400, "gradients": 400, "optimizer": 800}
    half = {k: v // 2 for k, v in one.items()}
    printed = table({"tiny": {1: [one], 2: [half, {k: v - 8 for k, v in half.items()}]}}).splitlines()
    assert printed[1].endswith("100.0%") and printed[2].endswith("50.0%")  # the larger rank counts
