"""Persisting and resuming under trainer.parallelism fsdp, in the sharded format (shards.py, issue #15).

A persist is collective. Rank 0 says whether it persists now and which directory: its temp directory
for the version (checkpoints.temp_dir, named after rank 0's pid: pid and version travel as an int64 broadcast).
Every rank then writes its own rows of the AdamW state and of the critic into that directory,
trainer_state.rankRRRRR-of-WWWWW.safetensors (rank 0 also the index, trainer_state.shards.json), on
the trainer's thread: the optimizer state is never gathered, and no rank holds more than its shard.
Rank 0 then hands the rest to the background writer as before: the gathered whole weights as the
Hugging Face model.safetensors (belay eval and the policy load the directory as they always did), the
RNG and the JSON state, after which write_checkpoint commits the directory with every rank's file in it.

Why the shards are written on the trainer's thread: the ranks' files must be complete before rank 0
commits, and the collectives that say so (write_shards' all_gather) may not run on a second thread
beside FSDP2's. Written from the live shards, they need no snapshot copy. What it costs: each rank
writes 8 bytes per trained parameter / world size (AdamW's two moments) and fsyncs it, the seconds
logged per rank at INFO and counted in the step's persist seconds.

On resume, a checkpoint with trainer_state.shards.json gives each rank exactly its rows of the AdamW
state and the critic, at any rank count (a plain single process too); the policy's weights come from
the Hugging Face files, each fsdp rank reading only its rows of them (gathering.load_weight_rows)."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import time
from typing import TYPE_CHECKING

import torch

from ..common.checkpoints import temp_dir
from ..common.lora import load_weights_or_adapter
from . import gathering, shards

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def parameter_names(trainer: Trainer) -> list[str]:
    """The trained parameters' names ('model.…', 'value_head.…') in the optimizer's order, the same
    unwrapped, under ddp and under fsdp: the sharded optimizer state is checked against them on load."""
    learner = getattr(trainer.learner, "module", trainer.learner)  # DDP's wrapped Learner
    names = {id(p): n for n, p in learner.named_parameters()}
    return [names[id(p)] for p in trainer.parameters]


def state_tensors(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """(the tensors a sharded persist writes, keyed as the one-rank trainer_state.safetensors keys them:
    'optimizer/state/<i>/<name>' and 'value_head/<name>'; the optimizer's JSON-able rest)."""
    optimizer_tensors, rest = shards.optimizer_state_tensors(trainer.optimizer, parameter_names(trainer))
    tensors = {f"optimizer/{k}": v for k, v in optimizer_tensors.items()}
    if trainer.value_head is not None:
        tensors.update({f"value_head/{k}": v for k, v in trainer.value_head.named_parameters()})
    return tensors, rest


def persist_together(trainer: Trainer, wanted: bool | None, wait: bool = False) -> float:
    """All ranks under fsdp: rank 0 says whether it persists now (`wanted`; None on the other ranks);
    if so, every rank writes its shards and rank 0 persists the rest in the background (wait=True: and
    waits for it). Returns the seconds on this thread."""
    started = time.perf_counter()
    main = trainer.main_rank
    if main and wanted:  # the version's temp directory, before any other rank hears of it
        trainer.persister.wait()  # the previous persist: a failed one removes its directory
        directory = temp_dir(trainer.config.run.checkpoint_dir, trainer.version)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    said = [int(bool(wanted)), os.getpid(), trainer.version] if main else [0, 0, 0]
    wanted, owner, version = trainer.distributed.broadcast_ints(said)
    if not wanted:
        return 0.0
    if version != trainer.version:  # a bug; raising here alone would leave the other ranks in write_shards
        log.error("rank %d is at version %d, rank 0 at %d", trainer.distributed.rank, trainer.version, version)
    directory = temp_dir(trainer.config.run.checkpoint_dir, version, owner)
    tensors, rest = state_tensors(trainer)
    writing = time.perf_counter()
    shards.write_shards(directory, tensors, trainer.distributed.rank, trainer.distributed.world_size)
    trainer.shard_write_seconds = time.perf_counter() - writing
    log.info(
        "rank %d wrote its AdamW and critic shards of version %d in %.2f s",
        trainer.distributed.rank,
        version,
        trainer.shard_write_seconds,
    )
    if main:  # write_shards returns on rank 0 once every rank's file is complete
        trainer.sharded_optimizer_rest = rest
        trainer.persist(wait=wait)
    return time.perf_counter() - started


def is_sharded_checkpoint(path: pathlib.Path) -> bool:
    return (path / shards.SHARD_INDEX).is_file()


def restore_sharded(trainer: Trainer, path: pathlib.Path, meta: dict) -> None:
    """A checkpoint persisted under fsdp, at any rank count: this rank's rows of the policy's weights from
    its Hugging Face files (all of them in one process), of the critic and of the AdamW state from the shards."""
    if trainer.sharded:
        gathering.load_weight_rows(trainer, path)
    else:
        load_weights_or_adapter(trainer.model, path)
    index = shards.read_shard_index(path)
    if trainer.value_head is not None:
        shards.load_shards_into(path, {f"value_head/{k}": v for k, v in trainer.value_head.named_parameters()})
    like = shards.optimizer_state_like(trainer.optimizer, index, prefix="optimizer/")
    loaded = shards.read_shards(path, like)
    flat = {k.removeprefix("optimizer/"): v for k, v in loaded.items()}
    shards.load_optimizer_state(trainer.optimizer, flat, meta["optimizer"], parameter_names(trainer))
