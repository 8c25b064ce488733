"""The policy's Prometheus signals."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..common.metrics import LLM_SECONDS_BUCKETS


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry  # for signals registered elsewhere (canaries.py)
        self.generated_tokens = Counter(
            "belay_policy_generated_tokens_total", "Response tokens sampled", registry=registry
        )
        self.responses = Counter(
            "belay_policy_responses_total", "Responses sampled, by finish reason", ["finish_reason"], registry=registry
        )
        self.generation_seconds = Histogram(
            "belay_policy_generation_seconds",
            "Time to sample a batch and its behaviour logprobs",
            buckets=LLM_SECONDS_BUCKETS,
            registry=registry,
        )
        self.swap_seconds = Histogram(
            "belay_policy_hot_swap_seconds",
            "Time to hot-swap to a new version",
            buckets=LLM_SECONDS_BUCKETS,
            registry=registry,
        )
        self.version = Gauge("belay_policy_version", "Policy version now serving", registry=registry)
        self.rollouts_written = Counter(
            "belay_policy_rollouts_written_total", "Rollouts added to the stream", registry=registry
        )
        self.batch_failures = Counter(
            "belay_policy_batch_failures_total",
            "Rollout batches abandoned, by the dependency that failed",
            ["reason"],
            registry=registry,
        )
        self.dependency_seconds = Histogram(
            "belay_policy_dependency_seconds",
            "Reference and reward call time seen by the actor",
            ["dependency"],
            buckets=LLM_SECONDS_BUCKETS,
            registry=registry,
        )
        self.backpressure_seconds = Counter(
            "belay_policy_backpressure_seconds_total",
            "Time the actor waited because the queue was full",
            registry=registry,
        )

    def observe_generation(self, batch) -> None:
        self.generated_tokens.inc(sum(len(r) for r in batch.response_ids))
        for reason in batch.finish_reasons:
            self.responses.labels(finish_reason=reason).inc()
        self.generation_seconds.observe(batch.seconds)

    def record_swap(self, seconds: float, version: int) -> None:
        if seconds:
            self.swap_seconds.observe(seconds)
        self.version.set(version)
