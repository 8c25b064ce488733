"""Canary prompts: a fixed list the policy answers greedily at every new version, kept per version
(ReviewStore) so a person can read how the answers moved, and measured as a person reading them
would: drift from version 0's answers, and per answer the signals of greedy degeneration
(services/common/degeneration.py): repeated word 3-grams, the longest repeated span, compression
ratio, length against version 0's answer, and relevance to the prompt against version 0's.

Drift of one prompt = 1 - difflib's similarity ratio between the first version's response tokens
and this version's (0: the same answer, 1: nothing in common); the exported drift is its mean over
the prompts. Greedy decoding makes the answers a function of the weights alone, so any drift is
the policy moving, not sampling noise.

Relevance = cos(e(prompt), e(answer)), e a sentence embedding (all-MiniLM-L6-v2 by default),
computed here, in the policy process, on the CPU: the model is loaded once, on the first answer.
An answer is degenerate when its repeated 3-gram share passes policy.canary_repetition_bound or
its relevance falls more than policy.canary_relevance_drop_bound below version 0's and below
policy.canary_relevance_floor; the count of
degenerate answers of the newest version is belay_policy_canary_degenerate (BelayCanaryDegenerate).
"""

from __future__ import annotations

import difflib
import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge

from ..common import degeneration
from ..common.review_store import ReviewStore
from ..common.sentence_embedding import shared_embedder
from .engine import PolicyEngine, Sampling

log = logging.getLogger(__name__)

# The alert rule BelayCanaryDegenerate carries the same line as annotations.runbook (tests check it).
RUNBOOK = (
    "A canary's greedy answer loops or no longer fits its question (the reward pays for a phrase or a pattern): "
    "read the canaries on the review page, raise trainer.kl_coef, or set trainer.rollback_on_degenerate"
)
SIGNALS = (  # (record key, gauge name, help)
    ("repeated_ngram_share", "belay_policy_canary_repeated_ngram_share", "share of word 3-grams that repeat"),
    ("longest_repeated_span", "belay_policy_canary_longest_repeated_span_words", "words of the longest repeat"),
    ("compression_ratio", "belay_policy_canary_compression_ratio", "UTF-8 bytes over zlib-compressed bytes"),
    ("length_ratio", "belay_policy_canary_length_ratio", "answer tokens over version 0's answer's"),
    ("relevance", "belay_policy_canary_relevance", "cosine of prompt and answer sentence embeddings"),
    ("relevance_change", "belay_policy_canary_relevance_change", "relevance minus version 0's answer's"),
)


@dataclass(frozen=True)
class Bounds:
    repetition: float = 0.5  # policy.canary_repetition_bound
    relevance_drop: float = 0.25  # policy.canary_relevance_drop_bound
    relevance_floor: float = 0.25  # policy.canary_relevance_floor


def token_drift(first: list[int], now: list[int]) -> float:
    """1 - 2*M/T (difflib's ratio): M tokens matched in order, T tokens in both responses together."""
    if not first and not now:
        return 0.0
    return 1.0 - difflib.SequenceMatcher(None, first, now, autojunk=False).ratio()


def canary_drift(first_ids: list[list[int]], now_ids: list[list[int]]) -> float:
    if len(first_ids) != len(now_ids):
        raise ValueError(f"{len(now_ids)} canary answers to compare with {len(first_ids)} of the first version")
    return sum(token_drift(a, b) for a, b in zip(first_ids, now_ids)) / len(now_ids)


def answer_signals(text: str, length: int, relevance: float, first: dict, bounds: Bounds) -> dict:
    """One answer's degeneration signals and verdict (services/common/degeneration.py); `first`:
    version 0's answer to the same prompt as {text, length, relevance}."""
    share = degeneration.repeated_ngram_share(text)
    first_share = degeneration.repeated_ngram_share(first["text"])
    change = relevance - first["relevance"]
    return {
        "repeated_ngram_share": share,
        "longest_repeated_span": degeneration.longest_repeated_span(text),
        "compression_ratio": degeneration.compression_ratio(text),
        "length_ratio": degeneration.length_ratio(length, first["length"]),
        "relevance": relevance,
        "relevance_change": change,
        "degenerate": degeneration.is_degenerate(
            share, first_share, relevance, change, bounds.repetition, bounds.relevance_drop, bounds.relevance_floor
        ),
    }


class Canaries:
    def __init__(
        self,
        prompts: list[str],
        max_new_tokens: int,
        store: ReviewStore,
        registry: CollectorRegistry,
        bounds: Bounds = Bounds(),
        embedding_model_dir: str = "",
    ):
        if not prompts:
            raise ValueError("canary prompts: the list is empty")
        self.prompts, self.max_new_tokens, self.store = prompts, max_new_tokens, store
        self.bounds, self.embedding_model_dir = bounds, embedding_model_dir
        self.drift = Gauge(
            "belay_policy_canary_drift",
            "Mean token-level drift of the canary prompts' greedy "
            "answers from the first version's (0 same, 1 nothing in common)",
            registry=registry,
        )
        self.version = Gauge(
            "belay_policy_canary_version", "Policy version whose canary answers were last taken", registry=registry
        )
        self.degenerate = Gauge(
            "belay_policy_canary_degenerate",
            "Canary answers of the newest version that are degenerate (repetition or relevance past its bound)",
            registry=registry,
        )
        # labelled by the canary's index in the prompt file, not its text: a bounded label set
        self.signals = {
            key: Gauge(name, f"Per canary answer, newest version: {text}", ["canary"], registry=registry)
            for key, name, text in SIGNALS
        }

    def relevance(self, answers: list[str]) -> list[float]:
        """cos(e(prompt_i), e(answer_i)) for each canary: unit embeddings, so a row-wise dot product."""
        embedder = shared_embedder(self.embedding_model_dir, "policy.canary_embedding_model_dir")
        prompts, texts = embedder.embed(self.prompts), embedder.embed(answers)  # (N, H) each, unit rows
        return (prompts * texts).sum(dim=1).tolist()

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
        relevance = self.relevance(batch.texts)
        if same_prompts:
            stored = [s["relevance"] for s in first["signals"]] if "signals" in first else None
            stored = None if stored is None or None in stored else stored  # null: stored for NaN
            firsts = zip(first["outputs"], first["output_ids"], stored or self.relevance(first["outputs"]))
        else:  # this version is the baseline
            firsts = zip(batch.texts, batch.response_ids, relevance)
        signals = [
            answer_signals(
                text, len(ids), now, {"text": text0, "length": len(ids0), "relevance": relevance0}, self.bounds
            )
            for text, ids, now, (text0, ids0, relevance0) in zip(batch.texts, batch.response_ids, relevance, firsts)
        ]
        record = {
            "time": time.time(),
            "prompts": self.prompts,
            "outputs": batch.texts,
            "output_ids": batch.response_ids,
            "drift": canary_drift(first["output_ids"], batch.response_ids) if same_prompts else 0.0,
            "signals": signals,
            "degenerate": [i for i, s in enumerate(signals) if s["degenerate"]],
            "seconds": time.perf_counter() - started,
        }
        self.store.record_canaries(batch.version, record)
        self.export(batch.version, record)
        return record

    def export(self, version: int, record: dict) -> None:
        """The gauges, the log line, and a WARNING per degenerate answer."""
        self.drift.set(record["drift"])
        self.version.set(version)
        self.degenerate.set(len(record["degenerate"]))
        for index, signals in enumerate(record["signals"]):
            for key, gauge in self.signals.items():
                gauge.labels(canary=str(index)).set(signals[key])
        log.info(
            "canaries of version %d: drift %.3f from the first version, %d degenerate (%.1f s)",
            version,
            record["drift"],
            len(record["degenerate"]),
            record["seconds"],
        )
        for index in record["degenerate"]:
            s = record["signals"][index]
            log.warning(
                "canary_degenerate: version %d, canary %d (%r): repeated 3-grams %.2f (bound %.2f), relevance %.2f "
                "(%+.2f from version 0's, bound -%.2f): %r. %s",
                version,
                index,
                self.prompts[index],
                s["repeated_ngram_share"],
                self.bounds.repetition,
                s["relevance"],
                s["relevance_change"],
                self.bounds.relevance_drop,
                record["outputs"][index][:200],
                RUNBOOK,
            )
