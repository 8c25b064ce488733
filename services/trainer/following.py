"""Data-parallel training under torchrun: rank 0 reads Redis, publishes and persists; every other
rank trains on the batches rank 0 broadcasts, its share of each minibatch, with gradients averaged."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..common.models import weights_fingerprint
from .distributed import decode_rollouts

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def follow_rank_zero(trainer: Trainer) -> None:
    """A rank other than 0: train on each batch rank 0 broadcasts, until it sends nothing."""
    while payload := trainer.distributed.broadcast_bytes(None):
        if trainer.update(decode_rollouts(payload)).optimizer_steps:
            trainer.version += 1
        after_distributed_step(trainer)


def after_distributed_step(trainer: Trainer) -> None:
    """Wait for rank 0's publish; at DEBUG, log this rank's weights so identical replicas can be checked."""
    trainer.distributed.barrier()
    if log.isEnabledFor(logging.DEBUG):  # hashing every weight costs ~0.5 s on 135M: only when asked
        log.debug(
            "rank %d weights after version %d: %s",
            trainer.distributed.rank,
            trainer.version,
            weights_fingerprint(trainer.model)[:16],
        )
