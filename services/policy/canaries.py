"""Canary prompts: a fixed list the policy answers greedily at every new version, kept per version
(ReviewStore) so a person can read how the answers moved, and reduced to one number, the drift
from the first version's answers, exported as belay_policy_canary_drift.

Drift of one prompt = 1 - difflib's similarity ratio between the first version's response tokens
and this version's (0: the same answer, 1: nothing in common); the exported drift is its mean over
the prompts. Greedy decoding makes the answers a function of the weights alone, so any drift is
the policy moving, not sampling noise.
"""

from __future__ import annotations

import difflib
import logging
import time

from prometheus_client import CollectorRegistry, Gauge

from ..common.review_store import ReviewStore
from .engine import PolicyEngine, Sampling

log = logging.getLogger(__name__)


def token_drift(first: list[int], now: list[int]) -> float:
    """1 - 2*M/T (difflib's ratio): M tokens matched in order, T tokens in both responses together."""
    if not first and not now:
        return 0.0
    return 1.0 - difflib.SequenceMatcher(None, first, now, autojunk=False).ratio()


def canary_drift(first_ids: list[list[int]], now_ids: list[list[int]]) -> float:
    if len(first_ids) != len(now_ids):
        raise ValueError(f"{len(now_ids)} canary answers to compare with {len(first_ids)} of the first version")
    return sum(token_drift(a, b) for a, b in zip(first_ids, now_ids)) / len(now_ids)


class Canaries:
    def __init__(self, prompts: list[str], max_new_tokens: int, store: ReviewStore, registry: CollectorRegistry):
        if not prompts:
            raise ValueError("canary prompts: the list is empty")
        self.prompts, self.max_new_tokens, self.store = prompts, max_new_tokens, store
        self.drift = Gauge(
            "belay_policy_canary_drift",
            "Mean token-level drift of the canary prompts' greedy "
            "answers from the first version's (0 same, 1 nothing in common)",
            registry=registry,
        )
        self.version = Gauge(
            "belay_policy_canary_version", "Policy version whose canary answers were last taken", registry=registry
        )

    def answer(self, engine: PolicyEngine) -> dict | None:
        """Answer the canaries if this version has no record yet (a restarted policy does not redo
        one); returns the record written, or None."""
        version = engine.version
        if self.store.has_canaries(version):
            return None
        started = time.perf_counter()
        batch = engine.generate(self.prompts, 1, Sampling(temperature=0.0, max_new_tokens=self.max_new_tokens))
        first = self.store.first_canaries()
        same_prompts = first is not None and first["prompts"] == self.prompts
        if first is not None and not same_prompts:
            log.warning("canary prompts differ from the first version's: drift is measured from this version")
        drift = canary_drift(first["output_ids"], batch.response_ids) if same_prompts else 0.0
        record = {
            "time": time.time(),
            "prompts": self.prompts,
            "outputs": batch.texts,
            "output_ids": batch.response_ids,
            "drift": drift,
            "seconds": time.perf_counter() - started,
        }
        self.store.record_canaries(batch.version, record)
        self.drift.set(drift)
        self.version.set(batch.version)
        log.info(
            "canaries of version %d: drift %.3f from the first version (%.1f s)",
            batch.version,
            drift,
            record["seconds"],
        )
        return record
