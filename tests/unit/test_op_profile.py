"""services/bench/op_profile.py: one call profiled op by op (the GPU bench's --profile, issue #14), on
the CPU, where the ranking is by each op's own CPU time."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from services.bench.op_profile import all_threads, launch_counts, profile_lines, profile_ops


def test_profile_counts_each_op_ranks_them_and_returns_the_result():
    big, small = torch.randn(384, 384), torch.randn(8, 8)

    def action():
        for _ in range(7):
            torch.mm(big, big)
        for _ in range(3):
            torch.sort(small)
        return "the result"

    result, figures = profile_ops(torch.device("cpu"), action, top=50)

    assert result == "the result"
    calls = {op["name"]: op["calls"] for op in figures["ops"]}
    assert calls["aten::mm"] == 7 and calls["aten::sort"] == 3
    costs = [op["self_cpu_seconds"] for op in figures["ops"]]
    assert costs == sorted(costs, reverse=True)
    names = [op["name"] for op in figures["ops"]]
    assert names.index("aten::mm") < names.index("aten::sort")  # seven 384^2 matmuls outweigh three tiny sorts
    assert figures["device_busy_seconds"] is None and figures["ranked_by"] == "self_cpu_seconds"
    assert figures["kernel_launches"] is None and figures["host_ops"] is None  # no CUDA activity on the CPU
    assert 0 < sum(costs) <= figures["wall_seconds"]


@pytest.mark.skipif(all_threads() is None, reason="this torch's profiler records its own thread only")
def test_ops_on_another_thread_are_recorded_too():
    """Continuous batching (policy.kv_cache = paged) runs its forwards on a thread of its own."""
    a = torch.randn(64, 64)
    worker = threading.Thread(target=lambda: [torch.mm(a, a) for _ in range(5)])

    def action():
        worker.start()
        worker.join()

    _, figures = profile_ops(torch.device("cpu"), action, top=50)
    assert {op["name"]: op["calls"] for op in figures["ops"]}.get("aten::mm") == 5


def test_top_keeps_the_costliest_ops_only():
    a = torch.randn(64, 64)
    _, figures = profile_ops(torch.device("cpu"), lambda: [torch.mm(a, a) + 1 for _ in range(4)], top=1)
    assert len(figures["ops"]) == 1


def test_launches_are_the_runtimes_launch_calls_and_graph_replays_counted_apart():
    """The averaged events a CUDA profile holds (key, count): kernels, runtime calls and ops alike."""
    events = [
        SimpleNamespace(key="cudaLaunchKernel", count=900),
        SimpleNamespace(key="cuLaunchKernelEx", count=40),
        SimpleNamespace(key="cudaGraphLaunch", count=128),
        SimpleNamespace(key="cudaMemcpyAsync", count=300),  # a copy, not a launch
        SimpleNamespace(key="aten::mm", count=500),
        SimpleNamespace(key="void at::native::vectorized_elementwise_kernel<4>", count=700),  # a kernel itself
    ]
    assert launch_counts(events) == {"kernel_launches": 940, "graph_launches": 128}


def test_lines_give_per_step_times_and_one_line_an_op():
    figures = {
        "wall_seconds": 2.0,
        "device_busy_seconds": 0.5,
        "kernel_launches": 120_000,
        "graph_launches": 0,
        "ranked_by": "self_device_seconds",
        "ops": [
            {"name": "aten::mm", "calls": 400, "self_device_seconds": 0.3, "self_cpu_seconds": 0.9},
            {"name": "aten::sort", "calls": 100, "self_device_seconds": 0.1, "self_cpu_seconds": 0.01},
        ],
    }
    head, *ops = profile_lines(figures, steps=100)
    assert "20.0 ms a step" in head  # 2.0 s / 100 steps
    assert "busy 0.50 s (25 %)" in head and "idle 15.0 ms a step" in head  # (2.0 - 0.5) s / 100
    assert "1200 kernel launches a step, 0 graph replays" in head
    assert len(ops) == 2 and "0.300 s" in ops[0] and "aten::mm" in ops[0] and "400" in ops[0]
