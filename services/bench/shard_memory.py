"""Parameter, gradient and optimizer-state bytes per rank with FSDP2 against the single-rank trainer (issue
#15's target: at 2 ranks at most 60 % of one rank's).

    python -m services.bench.shard_memory [--shapes tiny smollm2-135m] [--world-sizes 1 2 4] [--json OUT]

Tensor bytes, not process memory: the sum of nbytes of every parameter's local shard, of every gradient's
local shard and of every AdamW state tensor's local shard (exp_avg, exp_avg_sq, the step counter), after one
forward, backward and AdamW step on a small random batch, gradients still held. World size 1 is the
single-rank trainer: the model whole, no FSDP. Above 1, that many gloo ranks on the CPU, the model under
torch.distributed.fsdp.fully_shard on each decoder layer and the root (FSDP2 shards dim 0 of every
parameter), as the trainer's fsdp parallelism does. Shapes: `tiny` (services/bench/shapes.py) and
`smollm2-135m`, SmolLM2-135M-Instruct's config.json with random weights. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from ..common.ports import free_port
from .shapes import SHAPES

SMOLLM2_CONFIG = pathlib.Path.home() / ".cache/belay/SmolLM2-135M-Instruct/config.json"
KINDS = ("parameters", "gradients", "optimizer")


def build_model(shape: str) -> torch.nn.Module:
    """A randomly initialised model of `shape`, in float32 (the trainer's master weights)."""
    torch.manual_seed(0)
    if shape == "smollm2-135m":
        return LlamaForCausalLM(LlamaConfig.from_json_file(SMOLLM2_CONFIG)).float()
    config_class, model_class, fields = SHAPES[shape]
    return model_class(config_class(**fields)).float()


def local_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes this rank holds of `tensor`: a DTensor's local shard, a plain tensor whole."""
    if tensor is None:
        return 0
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).nbytes


def tensor_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    parameters = list(model.parameters())  # a tied weight counted once
    return {
        "parameters": sum(local_bytes(p) for p in parameters),
        "gradients": sum(local_bytes(p.grad) for p in parameters),
        "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
    }


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Forward, backward and an AdamW step on a (2, 16) random batch; the gradients stay."""
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def measure_rank(rank: int, world_size: int, port: int, shape: str, out: str) -> None:
    """One rank of `world_size` (1: the single-rank trainer, no FSDP): its tensor bytes into out/rank<r>.json."""
    torch.set_num_threads(1 if world_size > 1 else torch.get_num_threads())
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = build_model(shape)
        if world_size > 1:
            mesh = init_device_mesh("cpu", (world_size,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        one_step(model, optimizer)
        (pathlib.Path(out) / f"rank{rank}.json").write_text(json.dumps(tensor_bytes(model, optimizer)))
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def measure(shape: str, world_size: int) -> list[dict[str, int]]:
    """Each rank's tensor bytes, rank 0 first."""
    with tempfile.TemporaryDirectory() as out:
        if world_size == 1:
            measure_rank(0, 1, 0, shape, out)
        else:
            mp.spawn(measure_rank, args=(world_size, free_port(), shape, out), nprocs=world_size)
        return [json.loads((pathlib.Path(out) / f"rank{r}.json").read_text()) for r in range(world_size)]


def table(results: dict[str, dict[int, list[dict[str, int]]]]) -> str:
    """Per shape and rank count: the largest rank's bytes of each kind, and its total against one rank's."""
    lines = [
        f"{'shape':<14}{'ranks':>6}{'parameters':>14}{'gradients':>14}{'optimizer':>14}{'total':>14}{'vs 1 rank':>11}"
    ]
    for shape, by_size in results.items():
        single = sum(by_size[1][0].values()) if 1 in by_size else None
        for world_size, ranks in sorted(by_size.items()):
            largest = max(ranks, key=lambda r: sum(r.values()))
            total = sum(largest.values())
            share = f"{100 * total / single:>10.1f}%" if single else f"{'-':>11}"
            cells = "".join(f"{largest[k] / 2**20:>11.2f} MB" for k in KINDS)
            lines.append(f"{shape:<14}{world_size:>6}{cells}{total / 2**20:>11.2f} MB{share}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--json", type=pathlib.Path, help="also write every rank's bytes here")
    args = parser.parse_args()
    results = {shape: {w: measure(shape, w) for w in args.world_sizes} for shape in args.shapes}
    print("tensor bytes per rank (the largest rank), after one AdamW step with the gradients held")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
