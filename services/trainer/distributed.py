"""Data-parallel training under torchrun: rank 0 reads rollouts and writes checkpoints; every rank
trains on its share of each minibatch, and DDP or FSDP2 (parallel.py) reduce the gradients in backward,
so all ranks hold the same weights (or shards of them) after every optimizer step. Here: the process
group (gloo on CPU, nccl on GPU) and the decisions ranks take together (all_true, sums, broadcasts
from rank 0), not gradients. Rollouts travel between ranks as JSON bytes in a uint8 tensor, never as pickles."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..common.rollout_queue import Rollout


@dataclass
class Distributed:
    rank: int
    world_size: int

    @classmethod
    def from_environment(cls, device: torch.device) -> Distributed | None:
        """Join the process group torchrun describes (WORLD_SIZE > 1); None for a single process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this rank's GPU (rank_device), which NCCL's collectives use
        dist.init_process_group(backend=backend_for(device))
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Rank 0's payload, on every rank."""
        size = torch.tensor([len(payload) if self.is_main else 0], dtype=torch.long)
        dist.broadcast(size, src=0)
        buffer = (
            torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            if self.is_main and size.item()
            else torch.empty(int(size.item()), dtype=torch.uint8)
        )
        if size.item():
            dist.broadcast(buffer, src=0)
        return bytes(buffer.numpy().tobytes())

    def decide(self, flag: bool) -> bool:
        """Rank 0's flag, on every rank (what the other ranks pass is ignored)."""
        value = torch.tensor([1 if flag else 0], dtype=torch.long)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def broadcast_ints(self, values: list[int]) -> list[int]:
        """Rank 0's `values`, on every rank (the others pass as many, ignored): int64s, never *_object's pickles."""
        tensor = torch.tensor(values, dtype=torch.long)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()

    def all_true(self, flag: bool) -> bool:
        return self.all_true_each([flag])[0]

    def all_true_each(self, flags: list[bool]) -> list[bool]:
        """For each flag, whether it is true on every rank (one all-reduce for all of them)."""
        values = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.long)
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
        return [bool(v) for v in values.tolist()]

    def sum_each(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (one all-reduce, float64)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def max(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Leave the process group together: a rank that exits with gloo's threads still up aborts."""
        dist.barrier()
        dist.destroy_process_group()


def backend_for(device: torch.device) -> str:
    """gloo on the CPU; on CUDA, NCCL for CUDA tensors (FSDP2, DDP) and gloo for the CPU tensors the
    decisions and rollouts travel in (plain "nccl" refuses CPU tensors)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA each rank takes its own GPU: trainer.device "cuda" becomes
    cuda:LOCAL_RANK. A device given with an index, the CPU, and a single process are left as they are."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type != "cuda" or device.index is not None or local_rank is None:
        return device
    return torch.device("cuda", int(local_rank))


def encode_rollouts(rollouts: list[Rollout]) -> bytes:
    """Rollouts as JSON (binary fields base64), the same fields the Redis stream carries."""
    rows = [
        {k: ({"b64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v) for k, v in r.to_fields().items()}
        for r in rollouts
    ]
    return json.dumps(rows, allow_nan=False).encode()  # finite: to_fields validated each


def decode_rollouts(payload: bytes) -> list[Rollout]:
    rows = json.loads(payload)
    return [
        Rollout.from_fields(
            {
                k.encode(): (base64.b64decode(v["b64"]) if isinstance(v, dict) else str(v).encode())
                for k, v in row.items()
            }
        )
        for row in rows
    ]
