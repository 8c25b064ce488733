"""Where one call's time goes, op by op (torch.profiler), for the GPU bench's generation (issue #14).

Generation on the H200 measured 40 ms a decode step (6,363 tokens/s at 256 rows) where the weights'
reads and the matmuls need a few: the question for the next change is whether the rest is the
kernels' launch and Python (a case for CUDA graphs), the sampler's top-p sort over the vocabulary,
or attention. One profiled call answers it:
- device_busy_seconds: the kernels' own time, summed (one stream: they hardly overlap);
- wall_seconds - device_busy_seconds: the device idle, i.e. waiting on the host (launches, Python);
- ops: the ops that cost most, by the time of the kernels each launched (its own, not its
  children's) on a GPU, by its own CPU time on the CPU, each with its call count; on a GPU also
  host_ops, the ops that cost the host most (its own CPU time);
- kernel_launches and graph_launches: the CUDA runtime's launch calls, one a kernel, and its CUDA
  graph replays (each replays many kernels at the cost of one call): thousands of kernel launches a
  step and no graph launches is a step bound by its launches.
The profiler's own overhead is in wall_seconds: the measured calls are timed without it. Every
thread's ops are recorded (continuous batching, policy.kv_cache = paged, runs its forwards on a thread
of its own), where torch's profiler offers it (profile_all_threads); where it does not, the ops of
other threads are missing from `ops` and their kernels still count in device_busy_seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch._C._profiler import _ExperimentalConfig
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .timing import synchronize

T = TypeVar("T")
TOP_OPS = 15
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")


def all_threads() -> _ExperimentalConfig | None:
    """The profiler's setting that records every thread's ops; None where this torch lacks it."""
    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        return None


def launch_counts(averages) -> dict:
    """Kernel launches and CUDA graph replays among the profiler's averaged events (key, count)."""
    return {
        "kernel_launches": sum(op.count for op in averages if op.key in KERNEL_LAUNCHES),
        "graph_launches": sum(op.count for op in averages if op.key in GRAPH_LAUNCHES),
    }


def op_rows(ops, on_gpu: bool) -> list[dict]:
    return [
        {
            "name": op.key,
            "calls": op.count,
            "self_device_seconds": op.self_device_time_total / 1e6 if on_gpu else None,
            "self_cpu_seconds": op.self_cpu_time_total / 1e6,
        }
        for op in ops
    ]


def profile_ops(device: torch.device, action: Callable[[], T], top: int = TOP_OPS) -> tuple[T, dict]:
    """(result, profile) of action() run once under torch.profiler (see the module's docstring)."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    synchronize(device)
    with profile(activities=activities, experimental_config=all_threads()) as profiler:
        start = time.perf_counter()  # after the profiler's own start-up
        result = action()
        synchronize(device)
        wall = time.perf_counter() - start
    averages = profiler.key_averages()
    host_ops = [op for op in averages if op.device_type == DeviceType.CPU]
    kernels = [op for op in averages if op.device_type == DeviceType.CUDA]

    def ranked(cost) -> list[dict]:
        return op_rows(sorted(host_ops, key=cost, reverse=True)[:top], on_gpu)

    def by_device(op):
        return op.self_device_time_total

    def by_cpu(op):
        return op.self_cpu_time_total

    return result, {
        "wall_seconds": wall,
        "device_busy_seconds": sum(op.self_device_time_total for op in kernels) / 1e6 if on_gpu else None,
        **(launch_counts(averages) if on_gpu else {"kernel_launches": None, "graph_launches": None}),
        "ranked_by": "self_device_seconds" if on_gpu else "self_cpu_seconds",
        "ops": ranked(by_device if on_gpu else by_cpu),
        "host_ops": ranked(by_cpu) if on_gpu else None,  # on the CPU: ops itself
    }


def profile_lines(figures: dict, steps: int) -> list[str]:
    """The profile as a few printable lines; `steps` (the forward passes of the call) gives per-step times."""
    wall, busy = figures["wall_seconds"], figures["device_busy_seconds"]
    head = f"profiled call: {wall:.2f} s wall, {1e3 * wall / steps:.1f} ms a step over {steps} steps"
    if busy is not None:
        idle = 1e3 * (wall - busy) / steps
        head += f"; device busy {busy:.2f} s ({100 * busy / wall:.0f} %), idle {idle:.1f} ms a step"
        launches, graphs = figures["kernel_launches"], figures["graph_launches"]
        head += f"; {launches / steps:.0f} kernel launches a step, {graphs} graph replays"
    key = figures["ranked_by"]
    return [head] + [f"  {op[key]:8.3f} s {op['calls']:7d} x {op['name']}" for op in figures["ops"]]
