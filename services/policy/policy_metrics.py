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
        self.top_p_rows = Counter(
            "belay_policy_top_p_rows_total",
            "Rows x decode steps the top-p window filtered (policy.top_p_window)",
            registry=registry,
        )
        self.top_p_sorted_rows = Counter(
            "belay_policy_top_p_sorted_rows_total",
            "Of those, the rows whose nucleus spilled past the window and took the full sort",
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
        self.add_data_gauges(registry)

    def add_data_gauges(self, registry: CollectorRegistry) -> None:
        """The prompt data's signals (observe_data)."""
        self.data_rows = Gauge(
            "belay_data_rows", "Prompt rows the actor holds, by split (train, heldout)", ["split"], registry=registry
        )
        self.data_rows_skipped = Gauge(
            "belay_data_rows_skipped",
            "Rows left out at start: their templated prompt passed data.max_prompt_tokens",
            registry=registry,
        )
        self.data_epoch = Gauge("belay_data_epoch", "Epoch of the next batch's first row (from 0)", registry=registry)
        self.data_index = Gauge("belay_data_index", "Rows of the current epoch already taken", registry=registry)
        self.data_finished = Gauge(
            "belay_data_finished", "1 once the last epoch (data.epochs) is done", registry=registry
        )

    def observe_data(self, data, position) -> None:
        """The prompt data (prompt_data.PromptData) and the actor's position in it (prompt_stream.DataPosition)."""
        self.data_rows.labels(split="train").set(len(data.train))
        self.data_rows.labels(split="heldout").set(len(data.heldout))
        self.data_rows_skipped.set(data.skipped_too_long)
        self.data_epoch.set(position.epoch)
        self.data_index.set(position.index)
        self.data_finished.set(int(position.finished))

    def observe_generation(self, batch) -> None:
        self.generated_tokens.inc(sum(len(r) for r in batch.response_ids))
        for reason in batch.finish_reasons:
            self.responses.labels(finish_reason=reason).inc()
        self.generation_seconds.observe(batch.seconds)
        self.top_p_rows.inc(batch.top_p_rows)
        self.top_p_sorted_rows.inc(batch.top_p_sorted_rows)

    def record_swap(self, seconds: float, version: int) -> None:
        if seconds:
            self.swap_seconds.observe(seconds)
        self.version.set(version)
