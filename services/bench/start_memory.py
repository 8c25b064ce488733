"""Peak resident memory per trainer rank at start under trainer.parallelism 'fsdp' (issue #15): the policy
loaded whole on every rank and then sharded (before), against built empty and filled with each rank's rows
(services/trainer/meta_start.py, after).

    python -m services.bench.start_memory [--model-dir ~/.cache/belay/SmolLM2-135M-Instruct] [--world 2]

Each way runs in fresh gloo processes on the CPU; each rank builds the real Trainer (no Redis, no policy)
and reports its peak RSS (getrusage ru_maxrss: the process's high-water mark, file-backed pages of the
memory-mapped safetensors included) and its RSS after imports, before the model. Prints; asserts nothing."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from prometheus_client import CollectorRegistry

from ..common.config import BelayConfig
from ..common.models import load_causal_lm, load_tokenizer
from ..common.ports import free_port
from ..trainer.distributed import Distributed
from ..trainer.meta_start import start_policy
from ..trainer.trainer import Trainer
from ..trainer.trainer_metrics import TrainerMetrics

SMOLLM2 = pathlib.Path.home() / ".cache/belay/SmolLM2-135M-Instruct"
MIB = 2**20


def current_rss() -> int:
    """This process's resident bytes now (Linux /proc)."""
    pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def rank_start(rank: int, world: int, port: int, model_dir: str, way: str, out: str) -> None:
    """One rank: join the group, start the trainer `way` ('whole' or 'empty'), write its memory figures."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    distributed = Distributed(rank=rank, world_size=world)
    config = BelayConfig.model_validate(
        {"trainer": {"model_dir": model_dir, "device": "cpu", "parallelism": "fsdp", "metrics_port": 0}}
    )
    before = current_rss()
    device = torch.device("cpu")
    if way == "whole":  # as services/trainer/__main__.py started before meta_start.py
        model = load_causal_lm(model_dir, device, "trainer.model_dir")
    else:
        model = start_policy(config, device, distributed)
    Trainer(config, model, load_tokenizer(model_dir), None, TrainerMetrics(CollectorRegistry()), None, distributed)
    dist.barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    pathlib.Path(out, f"{way}-rank{rank}.json").write_text(json.dumps({"before_model": before, "peak": peak}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(SMOLLM2))
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        for way in ("whole", "empty"):
            mp.spawn(rank_start, args=(args.world, free_port(), args.model_dir, way, out), nprocs=args.world)
            for rank in range(args.world):
                figures = json.loads(pathlib.Path(out, f"{way}-rank{rank}.json").read_text())
                print(
                    f"{way:5s} start, rank {rank} of {args.world}: peak RSS {figures['peak'] / MIB:7.1f} MiB "
                    f"({figures['before_model'] / MIB:6.1f} MiB before the model)"
                )


if __name__ == "__main__":
    main()
