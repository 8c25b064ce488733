"""Data-parallel training under torchrun: rank 0 reads Redis, publishes and persists; every other
rank trains on the batches rank 0 broadcasts, its share of each minibatch (DDP or FSDP2 reduce the
gradients), and under fsdp joins the gathers of the whole weights and, when rank 0 persists, writes
its own shard of AdamW and the critic (sharded_persist.py)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from ..common.models import weights_fingerprint
from . import gathering, rails, sharded_persist
from .distributed import decode_rollouts

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def follow_rank_zero(trainer: Trainer) -> None:
    """A rank other than 0: train on each batch rank 0 broadcasts, until it sends nothing."""
    while payload := trainer.distributed.broadcast_bytes(None):
        decision = json.loads(trainer.distributed.broadcast_bytes(None))  # rank 0's rails on this batch
        if decision["roll_back_to"] is not None:
            rails.follow_roll_back(trainer, decision["roll_back_to"])
        elif trainer.update(decode_rollouts(payload)).optimizer_steps:
            trainer.version += 1
            if trainer.sharded:  # as rank 0 in Trainer.step: the weights it publishes, this rank's shards
                gathering.gather_weights(trainer)
                sharded_persist.persist_together(trainer, None)
        after_distributed_step(trainer)
    if trainer.sharded:  # rank 0's last persist, in Trainer.finish
        sharded_persist.persist_together(trainer, None)


def after_distributed_step(trainer: Trainer) -> None:
    """Wait for rank 0's publish; at DEBUG, log this rank's weights so identical replicas can be checked."""
    trainer.distributed.barrier()
    if log.isEnabledFor(logging.DEBUG):  # hashing every weight costs ~0.5 s on 135M: only when asked
        # Under fsdp every rank gathers the whole weights (a collective: the log level is the run's, alike on all).
        weights = gathering.gather_weights(trainer, everywhere=True) if trainer.sharded else trainer.model
        log.debug(
            "rank %d weights after version %d: %s",
            trainer.distributed.rank,
            trainer.version,
            weights_fingerprint(weights)[:16],
        )
