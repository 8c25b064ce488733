"""One rank of a data-parallel update, for test_parallel_update.py: spawned by torch.multiprocessing
(gloo on CPU), it builds a real Trainer on the tiny model, runs one update on a fixed batch and
writes its full weights (the critic's too) as safetensors, for the test to compare with one rank.
options 'task': 'persist' (persist version 1 after the update) or 'resume' (resume it before).
`mutation`: 'no_reduction' turns the gradient reduction off (DDP: a comm hook that returns this
rank's own gradients; FSDP2: no gradient sync), 'nan_on_rank_1' makes rank 1's loss NaN."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from services.common.models import load_causal_lm, load_tokenizer
from services.common.rollout_queue import Rollout
from services.trainer import gathering, update
from services.trainer.distributed import Distributed
from services.trainer.trainer import Trainer
from services.trainer.trainer_metrics import TrainerMetrics

from .conftest import make_config


def fixed_rollouts(vocab_size: int, rows: int = 8, prompt: int = 5, response: int = 6) -> list[Rollout]:
    """`rows` rollouts of equal lengths (so every rank's share has the same token count), fixed ids."""
    generator = np.random.default_rng(0)
    return [
        Rollout(
            prompt_text="p",
            response_text="r",
            prompt_ids=generator.integers(3, vocab_size, prompt),
            response_ids=generator.integers(3, vocab_size, response),
            logprobs=generator.uniform(-6, -3, response).astype(np.float32),
            ref_logprobs=generator.uniform(-6, -3, response).astype(np.float32),
            reward=float(row % 3) - 1.0 + 0.1 * row,
            policy_version=0,
            finish_reason="length",
            group_id=f"g{row // 2}",
            group_size=2,
        )
        for row in range(rows)
    ]


def build_trainer(model_dir: str, checkpoint_dir: str, options: dict, distributed: Distributed | None) -> Trainer:
    lora = options.pop("lora", None)
    settings = {"model_dir": model_dir, "batch_size": 8, "minibatch_size": 4, "lr": 1e-3, **options}
    config = make_config(run={"checkpoint_dir": checkpoint_dir}, trainer=settings, lora=lora or {})
    model = load_causal_lm(model_dir, torch.device("cpu"), "trainer")
    tokenizer = load_tokenizer(model_dir)
    return Trainer(config, model, tokenizer, None, TrainerMetrics(CollectorRegistry()), None, distributed)


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every weight of the policy and critic, whole, on this rank (FSDP2 shards gathered)."""
    if trainer.distributed is None:
        state = trainer.learner.state_dict()
    else:
        state = get_model_state_dict(trainer.learner, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def mutate(trainer: Trainer, mutation: str | None, rank: int) -> None:
    if mutation == "no_reduction":
        if trainer.section.parallelism == "ddp":
            trainer.learner.register_comm_hook(None, lambda _, bucket: own_gradients(bucket))
        else:
            trainer.learner.set_requires_gradient_sync(False)
    elif mutation == "nan_on_rank_1" and rank == 1:
        original = update.minibatch_loss

        def nan_loss(*args):
            loss, info, entropy = original(*args)
            return loss * float("nan"), info, entropy

        update.minibatch_loss = nan_loss


def training_bytes(trainer: Trainer) -> int:
    """The bytes of this rank's trainable parameters, their gradients and AdamW state (tensor bytes,
    a shard's own under FSDP2; not process memory)."""

    def size(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.numel() * local.element_size()

    total = sum(size(p) + (size(p.grad) if p.grad is not None else 0) for p in trainer.parameters)
    return total + sum(size(v) for state in trainer.optimizer.state.values() for v in state.values() if v.dim())


def persist_version_1(trainer: Trainer) -> None:
    """As Trainer.step and following.follow do under fsdp: every rank joins the gathers, rank 0 persists."""
    trainer.version = 1
    if trainer.sharded:
        gathering.gather_weights(trainer)
        gathering.gather_optimizer(trainer, True)
    if trainer.main_rank:
        trainer.persist(wait=True)
    if trainer.distributed is not None:
        trainer.distributed.barrier()


def own_gradients(bucket) -> torch.futures.Future:
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def run(rank: int, world: int, port: int, model_dir: str, out: str, options: dict, mutation: str | None) -> None:
    """One rank (world 1: no process group at all); writes out/rank{rank}.safetensors and .json."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    distributed = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        distributed = Distributed(rank=rank, world_size=world)
    options = dict(options)
    task = options.pop("task", "update")  # 'persist': then persist as version 1; 'resume': resume it first
    checkpoints = options.pop("checkpoint_dir", str(pathlib.Path(out) / f"checkpoints{rank}"))
    trainer = build_trainer(model_dir, checkpoints, options, distributed)
    if task == "resume":
        assert trainer.resume() == 1
        save_file(full_weights(trainer), str(pathlib.Path(out) / f"rank{rank}-resumed.safetensors"))
    before = full_weights(trainer)
    mutate(trainer, mutation, rank)
    stats = trainer.update(fixed_rollouts(trainer.model.config.vocab_size))
    after = full_weights(trainer)
    if task == "persist":
        persist_version_1(trainer)
    save_file(after, str(pathlib.Path(out) / f"rank{rank}.safetensors"))
    moved = max(float((after[k] - before[k]).abs().max()) for k in after)
    summary = {
        "optimizer_steps": stats.optimizer_steps,
        "skipped": stats.skipped_minibatches,
        "moved": moved,
        "bytes": training_bytes(trainer),
    }
    (pathlib.Path(out) / f"rank{rank}.json").write_text(json.dumps(summary))
    if distributed is not None:
        distributed.close()
