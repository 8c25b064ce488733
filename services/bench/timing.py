"""Wall-clock timing of device work for the benches: CUDA runs asynchronously, so a time taken without
synchronising would measure the launch of the kernels, not their work."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, action: Callable[[], T]) -> tuple[T, float]:
    """(result, seconds) of action(), with the device's queued work finished on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = action()
    synchronize(device)
    return result, time.perf_counter() - start
