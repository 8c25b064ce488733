"""The pieces of a weight broadcast group both ends share: how a group is built over a store (never
the default group), how a bucket travels, and the key a replica sets once it is joining."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def ready_key(version: int) -> str:
    """Set by the replica under the group's prefix once it has accepted the request and is joining."""
    return f"ready/{version}"


def make_group(store: dist.Store, rank: int, world_size: int, backend: str, timeout_seconds: float):
    """A process group over `store` alone: gloo (CPU tensors) or NCCL (CUDA tensors); every op on it
    raises after timeout_seconds."""
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def broadcast_bucket(group, buffer: torch.Tensor) -> None:
    """Rank 0's flat buffer into every other rank's, in place; raises past the group's timeout."""
    options = dist.BroadcastOptions()
    options.rootRank, options.rootTensor = 0, 0
    group.broadcast([buffer], options).wait()
    if buffer.is_cuda:  # NCCL's wait only orders the stream: block until the bytes are really here
        torch.cuda.current_stream(buffer.device).synchronize()
