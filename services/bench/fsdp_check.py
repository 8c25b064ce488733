"""The trainer's fsdp parallelism on the device it will run on: one update on a fixed batch, sharded
with FSDP2 over every rank torchrun starts (NCCL and MixedPrecisionPolicy on CUDA, gloo on the CPU),
against the same update in one plain process (autocast, float32 masters). Prints the largest weight
difference beside how far the update moved the weights, the update's seconds and each rank's peak
memory. A check to run on a GPU machine (issue #15); it asserts nothing.

    torchrun --standalone --nproc_per_node=N -m services.bench.fsdp_check --shape qwen2.5-0.5b --device cuda
    python -m services.bench.fsdp_check --shape tiny --device cpu          (one rank, no torchrun)

One H200 runs one rank (NCCL refuses two ranks on one GPU); the plain update runs on rank 0 after."""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..common.config import BelayConfig
from ..common.models import load_causal_lm, resolve_dtype
from ..common.rollout_queue import Rollout
from ..common.strict_json import strict_json
from ..trainer.distributed import Distributed, backend_for, rank_device
from ..trainer.meta_start import start_policy
from ..trainer.trainer import Trainer
from ..trainer.trainer_metrics import TrainerMetrics
from .shapes import build_random_model, shape_fields, word_tokenizer
from .timing import timed


def fixed_rollouts(vocab_size: int, rows: int, prompt: int, response: int) -> list[Rollout]:
    generator = np.random.default_rng(0)
    lengths = [response - (row % 4) for row in range(rows)]  # unequal: each rank's share is weighed
    return [
        Rollout(
            prompt_text="p",
            response_text="r",
            prompt_ids=generator.integers(4, vocab_size, prompt),
            response_ids=generator.integers(4, vocab_size, lengths[row]),
            logprobs=generator.uniform(-6, -3, lengths[row]).astype(np.float32),
            ref_logprobs=generator.uniform(-6, -3, lengths[row]).astype(np.float32),
            reward=float(row % 3) - 1.0,
            policy_version=0,
            finish_reason="length",
            group_id=f"g{row}",
        )
        for row in range(rows)
    ]


def trainer_for(model_dir: pathlib.Path, args, device: torch.device, distributed: Distributed | None) -> Trainer:
    config = BelayConfig.model_validate(
        {
            "run": {"checkpoint_dir": str(pathlib.Path(args.workdir) / "checkpoints")},  # never written
            "trainer": {
                "model_dir": str(model_dir),
                "batch_size": args.rows,
                "minibatch_size": args.rows // 2,
                "lr": 1e-5,
                "dtype": args.dtype,
                "parallelism": "fsdp",
            },
        }
    )
    model = start_policy(config, device, distributed)  # as the trainer starts: under fsdp, built empty
    tokenizer = word_tokenizer(shape_fields(args.shape)["vocab_size"])
    return Trainer(config, model, tokenizer, None, TrainerMetrics(CollectorRegistry()), None, distributed)


def one_update(trainer: Trainer, rollouts: list[Rollout], device: torch.device) -> tuple[dict, float]:
    """The update, then the whole weights on the CPU (a collective under fsdp) and its seconds."""
    _, seconds = timed(device, lambda: trainer.update(rollouts))
    if trainer.distributed is None:
        state = {k: v.detach().cpu() for k, v in trainer.learner.state_dict().items()}
    else:  # whole on rank 0's CPU, empty elsewhere
        state = get_model_state_dict(trainer.learner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # the learner's "model.<name>": the policy's own names, as load_causal_lm's state_dict has them
    return {k.removeprefix("model."): v.float().clone() for k, v in state.items()}, seconds


def join_group(device: torch.device) -> Distributed:
    """The group torchrun describes (one rank without torchrun), on the backend the trainer uses."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(minutes=5))
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def run(args) -> dict | None:
    device = rank_device(torch.device(args.device))
    distributed = join_group(device)
    model_dir = pathlib.Path(args.workdir) / args.shape
    if distributed.is_main and not (model_dir / "config.json").exists():
        build_random_model(args.shape, model_dir, seed=0, device=args.device)
    distributed.barrier()
    vocab = shape_fields(args.shape)["vocab_size"]
    rollouts = fixed_rollouts(vocab, args.rows, args.prompt_tokens, args.response_tokens)
    trainer = trainer_for(model_dir, args, device, distributed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sharded, sharded_seconds = one_update(trainer, rollouts, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    peaks = torch.zeros(distributed.world_size, dtype=torch.long)  # each rank's, summed: no *_object pickles
    peaks[distributed.rank] = peak or 0
    dist.all_reduce(peaks)
    del trainer
    distributed.close()
    if not distributed.is_main:
        return None
    plain, plain_seconds = one_update(trainer_for(model_dir, args, device, None), rollouts, device)
    # The weights both updates started from: model_dir's, which neither trainer writes (read on rank 0 alone).
    start = load_causal_lm(str(model_dir), torch.device("cpu"), "model_dir").state_dict()
    names = [k for k in plain if k in sharded and k in start]
    diff = max(float((sharded[k] - plain[k]).abs().max()) for k in names)
    moved = max(float((plain[k] - start[k].float()).abs().max()) for k in names)
    return {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": backend_for(device),
        "world_size": distributed.world_size,
        "compute_dtype": str(resolve_dtype(args.dtype, device)).removeprefix("torch."),
        "max_abs_weight_diff": diff,
        "max_abs_weight_move": moved,
        "sharded_update_seconds": sharded_seconds,
        "plain_update_seconds": plain_seconds,
        "peak_memory_bytes_per_rank": peaks.tolist() if device.type == "cuda" else None,
        "versions": {"torch": torch.__version__},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.bench.fsdp_check", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="trainer.dtype: auto is bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "belay-fsdp-check"))
    parser.add_argument("--json", help="write the figures here (rank 0)")
    args = parser.parse_args(argv)
    figures = run(args)
    if figures is None:
        return
    text = strict_json(figures, indent=2)
    if args.json:
        pathlib.Path(args.json).write_text(text)
    print(text)
    print(
        f"fsdp x{figures['world_size']} on {figures['device']} ({figures['backend']}, {figures['compute_dtype']}): "
        f"max weight diff {figures['max_abs_weight_diff']:.2e} against a move of {figures['max_abs_weight_move']:.2e}; "
        f"update {figures['sharded_update_seconds']:.2f} s sharded, {figures['plain_update_seconds']:.2f} s plain",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
