"""What the trainer tells about each update: the failure detectors' verdicts (logged with their
runbook line when one starts firing), the step summary on /metrics, in the Redis steps stream and
the log, and the batch's samples on the review page."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from ..common.rollout_queue import Rollout
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
            "time": now,
        }
        for r in rollouts
    ]


def watch_for_failures(trainer: Trainer, summary: dict, rollouts: list[Rollout]) -> None:
    """The failure detectors (detectors.py) on this update: their values and the names of those
    firing go into the summary and /metrics; one starting to fire is logged with its runbook line."""
    values, firing, started = trainer.detectors.observe(
        summary, [r.prompt_text for r in rollouts], [r.response_text for r in rollouts]
    )
    summary.update(values, detectors_firing=[name for name, on in firing.items() if on])
    trainer.metrics.record_detectors(values, firing)
    for name in started:
        log.warning("failure detector %s is firing at version %d: %s", name, summary["version"], RUNBOOK[name])


def report(trainer: Trainer, summary: dict, rollouts: list[Rollout]) -> None:
    """The step on /metrics, in the steps stream, on the review page and in the log."""
    trainer.metrics.record_step(summary)
    watch_for_failures(trainer, summary, rollouts)
    until_redis_answers(lambda: trainer.queue.log_step(summary), "logging the step")
    if trainer.review is not None:
        samples = review_samples(rollouts, summary["version"])
        until_redis_answers(lambda: trainer.review.record_samples(samples), "recording samples for review")
    log.info(
        "version %d: reward %.3f±%.3f KL/seq %.3f len %.1f loss %.4f clip %.3f (%.1f s)",
        summary["version"],
        summary["reward_mean"],
        summary["reward_std"],
        summary["kl_per_sequence"],
        summary["response_length_mean"],
        summary["loss"],
        summary["clip_fraction"],
        summary["seconds"]["update"],
    )
