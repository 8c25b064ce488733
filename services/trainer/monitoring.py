"""What the trainer tells about each update: the failure detectors' verdicts (logged with their
runbook line when one starts firing), the step record on /metrics, in the Redis steps stream,
TensorBoard (tensorboard_log.py) and the log, and the batch's samples on the review page."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from ..common.rollout_queue import Rollout
from ..common.step_records import DetectorValues, StepRecord, UpdateStats
from .detectors import RUNBOOK
from .retry import until_redis_answers

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def review_samples(rollouts: list[Rollout], version: int) -> list[dict]:
    """What the review page shows of a batch: each rollout with its KL (k1, nats per response)."""
    now = time.time()
    return [
        {
            "rollout_id": r.rollout_id,
            "prompt": r.prompt_text,
            "response": r.response_text,
            "reward": float(r.reward),
            "kl": float(np.sum(r.logprobs) - np.sum(r.ref_logprobs)),
            "version": r.policy_version,
            "trained_into": version,
            "metadata": r.metadata,  # the prompt row's carried columns (data.metadata_columns), {} for none
            "time": now,
        }
        for r in rollouts
    ]


def watch_for_failures(
    trainer: Trainer, stats: UpdateStats, rollouts: list[Rollout], version: int
) -> tuple[DetectorValues, list[str]]:
    """The failure detectors (detectors.py) on this update: their values and the names of those
    firing, also set on /metrics; one starting to fire is logged with its runbook line."""
    values, firing, started = trainer.detectors.observe(
        stats, [r.prompt_text for r in rollouts], [r.response_text for r in rollouts]
    )
    trainer.metrics.record_detectors(values, firing)
    for name in started:
        log.warning("failure detector %s is firing at version %d: %s", name, version, RUNBOOK[name])
    return values, [name for name, on in firing.items() if on]


def report(trainer: Trainer, record: StepRecord, rollouts: list[Rollout]) -> None:
    """The step on /metrics, in the steps stream, in TensorBoard (with any new canary answers), on the
    review page and in the log."""
    trainer.metrics.record_step(record)
    until_redis_answers(lambda: trainer.queue.log_step(record), "logging the step")
    if trainer.tensorboard is not None:
        trainer.tensorboard.write_step(record)
        trainer.tensorboard.write_new_canaries(record.version)
    if trainer.best is not None:  # a held-out evaluation or a persist since the last step may mark a new best
        until_redis_answers(trainer.best.update, "marking the best version")
    if trainer.review is not None:
        samples = review_samples(rollouts, record.version)
        until_redis_answers(lambda: trainer.review.record_samples(samples), "recording samples for review")
    stats = record.stats
    log.info(
        "version %d: reward %.3f±%.3f KL/seq %.3f len %.1f loss %.4f clip %.3f (%.1f s)",
        record.version,
        stats.reward_mean,
        stats.reward_std,
        stats.kl_per_sequence,
        stats.response_length_mean,
        stats.loss,
        stats.clip_fraction,
        record.seconds.update,
    )
