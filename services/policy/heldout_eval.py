"""Evaluation during the run: every trainer.eval_every versions the policy answers the held-out rows
(data.heldout_rows, never trained on) and scores them through the same reward and reference services
the rollouts use, so the figures are the run's own, on prompts it did not learn from.

Why the policy: it holds the weights of the version being judged, the held-out rows, and clients for
the reward and the reference; answering right after a swap, like the canaries, costs the trainer
nothing. Each held-out row is answered once, sampled with the policy's temperature and top_p under a
fixed seed (the same draw of random numbers at every version), so the KL is an estimate of the true
KL(π‖π_ref) and versions are compared on the same footing.

Figures per version (Redis hash belay:R:evals, and gauges belay_policy_eval_*):
- reward_mean, reward_std: the reward service's raw scores;
- accuracy: the share of answers the math_answer reward scores correct (score 1), where the configured
  reward is math_answer or a combined reward with math_answer components; null otherwise;
- kl_per_sequence: mean over answers of Σ_t (log π(y_t) − log π_ref(y_t)), response tokens only (k1);
- response_length: mean response tokens.
The trainer marks the best persisted version by trainer.eval_metric (services/trainer/best_version.py).
"""

from __future__ import annotations

import logging
import math
import time

from prometheus_client import CollectorRegistry, Gauge

from ..common.config import BelayConfig, RewardConfig
from ..common.prompt_data import PromptRow
from ..common.review_store import ReviewStore
from ..common.sample_statistics import mean_and_std
from .engine import Sampling

log = logging.getLogger(__name__)

FIGURES = ("reward_mean", "reward_std", "accuracy", "kl_per_sequence", "response_length")


def accuracy_components(section: RewardConfig) -> list[str] | None:
    """Where correctness is read: [] for the total score (reward.backend math_answer), the names of the
    math_answer components of a combined reward, or None when the reward checks no answers."""
    if section.backend == "math_answer":
        return []
    names = [c.name for c in section.components if c.backend == "math_answer"] if section.backend == "combined" else []
    return names or None


def accuracy(scores: list[float], components: list[dict[str, float]], where: list[str] | None) -> float | None:
    """Share of answers scored correct (1.0) by math_answer: every named component, or the total when
    `where` is []; None when the reward has no math_answer."""
    if where is None or not scores:
        return None
    if not where:
        correct = [score >= 1.0 for score in scores]
    else:
        correct = [all(row.get(name, 0.0) >= 1.0 for name in where) for row in components]
    return sum(correct) / len(correct)


def eval_figures(
    rewards: list[float],
    components: list[dict[str, float]],
    policy_logprobs: list[list[float]],
    reference_logprobs: list[list[float]],
    where: list[str] | None,
) -> dict:
    """The figures of one evaluation from its per-answer parts (log-probs: one list per answer)."""
    reward_mean, reward_std = mean_and_std(rewards)
    kl = [math.fsum(p) - math.fsum(r) for p, r in zip(policy_logprobs, reference_logprobs)]
    return {
        "rows": len(rewards),
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "accuracy": accuracy(rewards, components, where),
        "kl_per_sequence": mean_and_std(kl)[0],
        "response_length": mean_and_std([float(len(p)) for p in policy_logprobs])[0],
    }


class HeldOutEval:
    """Answers and scores the held-out rows at every eval_every-th version, once per version (a
    restarted policy does not redo one already in Redis)."""

    def __init__(self, config: BelayConfig, rows: list[PromptRow], store: ReviewStore, registry: CollectorRegistry):
        if not rows:
            raise ValueError("trainer.eval_every is set but there are no held-out rows: set data.heldout_rows")
        self.config, self.store = config, store
        self.rows = rows[: config.trainer.eval_max_rows]
        self.every = config.trainer.eval_every
        self.where = accuracy_components(config.reward)
        self.gauges = {
            name: Gauge(f"belay_policy_eval_{name}", f"Held-out evaluation: {name}", registry=registry)
            for name in FIGURES
        }
        self.version = Gauge("belay_policy_eval_version", "Policy version last evaluated", registry=registry)

    def due(self, version: int) -> bool:
        return version % self.every == 0 and not self.store.has_eval(version)

    def run(self, actor) -> dict | None:
        """Evaluate the version the actor's engine serves, if due; returns the record written."""
        engine, policy = actor.engine, self.config.policy
        if not self.due(engine.version):
            return None
        started = time.perf_counter()
        sampling = Sampling(
            temperature=policy.temperature, top_p=policy.top_p, max_new_tokens=policy.max_new_tokens, seed=policy.seed
        )
        batch = engine.generate([row.chat for row in self.rows], 1, sampling)
        ref, rewards, components, reward_model_id, _ = actor.score(batch, self.rows)
        figures = eval_figures(
            rewards, components, [list(lp) for lp in batch.logprobs], [list(r[0]) for r in ref], self.where
        )
        record = {**figures, "time": time.time(), "reward_model_id": reward_model_id}
        record["seconds"] = time.perf_counter() - started
        self.store.record_eval(batch.version, record)
        for name in FIGURES:
            self.gauges[name].set(math.nan if figures[name] is None else figures[name])
        self.version.set(batch.version)
        accuracy_text = "" if figures["accuracy"] is None else f", accuracy {figures['accuracy']:.3f}"
        log.info(
            "held-out evaluation of version %d: reward %.3f%s, KL %.3f, length %.1f over %d rows (%.1f s)",
            batch.version,
            figures["reward_mean"],
            accuracy_text,
            figures["kl_per_sequence"],
            figures["response_length"],
            figures["rows"],
            record["seconds"],
        )
        return record
