"""The trainer's Prometheus signals: the seed's list (KL first), plus the update's own health."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..common.metrics import LLM_SECONDS_BUCKETS
from ..common.step_records import DetectorValues, StepRecord
from .detectors import DETECTORS

# Gauges set from each step's update figures: field of UpdateStats -> (metric name, help).
STATS_GAUGES = {
    "kl_per_token": ("belay_trainer_kl_per_token", "Mean k1 KL(policy || reference) per response token, nats"),
    "kl_per_sequence": ("belay_trainer_kl_per_sequence", "Mean KL(policy || reference) per response, nats"),
    "kl_coef": ("belay_trainer_kl_coef", "KL coefficient beta in reward - beta * KL"),
    "reward_mean": ("belay_trainer_reward_mean", "Mean raw reward of the batch"),
    "reward_std": ("belay_trainer_reward_std", "Standard deviation of raw rewards in the batch"),
    "total_reward_mean": ("belay_trainer_total_reward_mean", "Mean KL-penalised reward of the batch"),
    "response_length_mean": ("belay_trainer_response_length_tokens", "Mean response length, tokens"),
    "entropy": ("belay_trainer_entropy_nats", "Mean policy entropy per response token, nats"),
    "clip_fraction": ("belay_trainer_clip_fraction", "Share of response tokens whose PPO ratio was clipped"),
    "approx_kl": ("belay_trainer_approx_kl", "k3 estimate of KL(old policy || new policy) during the update"),
    "loss": ("belay_trainer_loss", "Clipped PPO loss (do not read it like a supervised loss)"),
    "grad_norm": ("belay_trainer_grad_norm", "Gradient norm before clipping"),
    "reward_length_correlation": (
        "belay_trainer_reward_length_correlation",
        "Pearson correlation of reward and response length in the batch (a length bias)",
    ),
    "distinct_2": ("belay_trainer_distinct_2", "Distinct word bigrams / all bigrams over the batch's responses"),
    "repetition_3": ("belay_trainer_repetition_3", "Mean share of repeated word trigrams within a response"),
    "logprob_mismatch_mean_abs": (
        "belay_trainer_logprob_mismatch_mean_abs",
        "Mean |log pi_trainer - log pi_behaviour| per response token before the update (NaN: not measured)",
    ),
    "logprob_mismatch_k3": (
        "belay_trainer_logprob_mismatch_k3",
        "k3 estimate of KL(behaviour || trainer before the update) per response token (NaN: not measured)",
    ),
}
VERSION_GAUGE = ("belay_trainer_policy_version", "Policy version last published")
# The failure detectors' values (services/trainer/detectors.py), NaN until their first window is full.
DETECTOR_GAUGES = {
    "reward_slope": (
        "belay_trainer_reward_slope_per_step",
        "Least-squares slope of the batch mean reward over the detector window, per update",
    ),
    "reward_rise_ratio": (
        "belay_trainer_reward_rise_ratio",
        "Fitted reward rise across the detector window, in mean batch reward standard deviations",
    ),
    "response_length_ratio": (
        "belay_trainer_response_length_ratio",
        "Mean response length over the detector window / over the first window",
    ),
    "cross_prompt_similarity": (
        "belay_trainer_cross_prompt_similarity",
        "Mean word 1-2-gram Jaccard similarity of responses to different prompts, over the window",
    ),
    "kl_per_sequence_window_max": (
        "belay_trainer_kl_per_sequence_window_max",
        "Largest batch KL per response over the detector window, nats",
    ),
}


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.define_update_metrics(registry)
        self.define_reward_model_metrics(registry)
        self.define_hand_off_metrics(registry)
        self.define_detector_metrics(registry)

    def define_update_metrics(self, registry: CollectorRegistry) -> None:
        """Each update's figures, and what the trainer consumed, dropped, skipped and rolled back."""
        self.gauges = {key: Gauge(name, text, registry=registry) for key, (name, text) in STATS_GAUGES.items()}
        self.gauges["version"] = Gauge(*VERSION_GAUGE, registry=registry)
        self.steps = Counter("belay_trainer_steps_total", "PPO updates published", registry=registry)
        self.consumed = Counter("belay_trainer_rollouts_consumed_total", "Rollouts trained on", registry=registry)
        self.dropped = Counter(
            "belay_trainer_rollouts_dropped_total", "Rollouts refused, by reason", ["reason"], registry=registry
        )
        for reason in ("stale", "malformed", "duplicate", "nonfinite", "orphaned", "out_of_memory"):
            self.dropped.labels(reason=reason)
        self.nonfinite_skips = Counter(
            "belay_trainer_nonfinite_skips_total",
            "Minibatch updates skipped for a NaN/Inf loss or gradient",
            registry=registry,
        )
        self.out_of_memory = Counter(
            "belay_trainer_out_of_memory_total",
            "Updates cut short by a CUDA out-of-memory (none stepped: the batch goes to the dropped stream)",
            registry=registry,
        )
        self.step_seconds = Histogram(
            "belay_trainer_step_seconds",
            "Time of one PPO update, publish and the "
            "persist's snapshot included (the persist's writing is in the background)",
            buckets=LLM_SECONDS_BUCKETS,
            registry=registry,
        )
        self.last_step = Gauge(
            "belay_trainer_last_step_timestamp_seconds", "Unix time of the last published step", registry=registry
        )
        self.logprobs = Histogram(
            "belay_trainer_policy_logprob",
            "Behaviour log-probabilities of response tokens",
            buckets=(-20, -10, -7, -5, -4, -3, -2, -1.5, -1, -0.5, -0.25, -0.1, -0.01, 0),
            registry=registry,
        )
        self.rollbacks = Counter(
            "belay_trainer_rollbacks_total",
            "Policy rolled back to the last good version after a batch passed kl_hard_limit",
            registry=registry,
        )
        self.ready = Gauge("belay_trainer_ready", "1 once the trainer has loaded and resumed", registry=registry)
        self.loss_scale = LossScaleFigures()  # read from the trainer's LossScale once watch_loss_scale is called
        registry.register(self.loss_scale)

    def define_reward_model_metrics(self, registry: CollectorRegistry) -> None:
        """Which reward model(s) scored the last batch, and the parts of a combined reward."""
        self.reward_model = Gauge(
            "belay_trainer_reward_model_info",
            "1 for the reward model(s) that scored the last batch, 0 for earlier ones",
            ["reward_model_id"],
            registry=registry,
        )
        self.reward_models_seen: set[str] = set()
        self.reward_components = Gauge(
            "belay_trainer_reward_component_mean",
            "Mean raw score of each part of a combined reward over the last batch",
            ["component"],
            registry=registry,
        )

    def define_hand_off_metrics(self, registry: CollectorRegistry) -> None:
        """The weight hand-off: publish every update, persist in the background."""
        self.publish_seconds = Histogram(
            "belay_trainer_publish_seconds",
            "Seconds on the critical path to publish a version's serving weights through the transport",
            ["transport"],
            buckets=LLM_SECONDS_BUCKETS,
            registry=registry,
        )
        self.publish_bytes = Gauge(
            "belay_trainer_publish_bytes",
            "Bytes the last publish moved per policy replica",
            ["transport"],
            registry=registry,
        )
        self.persist_seconds = Histogram(
            "belay_trainer_persist_seconds",
            "Seconds a background persist took to write and commit the full checkpoint",
            buckets=LLM_SECONDS_BUCKETS,
            registry=registry,
        )
        self.persisted_version = Gauge(
            "belay_trainer_persisted_version", "Newest version in a committed checkpoint", registry=registry
        )
        self.updates_since_persist = Gauge(
            "belay_trainer_updates_since_persist",
            "Updates published since the last persist began (their rollouts wait unacknowledged)",
            registry=registry,
        )
        self.seconds_since_persist = Gauge(
            "belay_trainer_seconds_since_persist", "Seconds since the last persist began", registry=registry
        )
        self.persist_interval = Gauge(
            "belay_trainer_persist_interval",
            "The persist cadence from the config, read by the alert rule (label: steps or seconds)",
            ["unit"],
            registry=registry,
        )
        self.persist_failures = Counter(
            "belay_trainer_persist_failures_total",
            "Persists that failed (their rollouts stay pending for the next one)",
            registry=registry,
        )

    def define_detector_metrics(self, registry: CollectorRegistry) -> None:
        """The failure detectors' values, verdicts and bounds (NaN and 0 until the first window is full)."""
        self.detector_values = {
            key: Gauge(name, text, registry=registry) for key, (name, text) in DETECTOR_GAUGES.items()
        }
        self.detector_firing = Gauge(
            "belay_trainer_detector_firing",
            "1 while the trainer's own failure detector concludes its failure mode is happening",
            ["detector"],
            registry=registry,
        )
        self.detector_bound = Gauge(
            "belay_trainer_detector_bound",
            "A failure detector's bound from the config (label: the trainer config field), read by the alert rules",
            ["bound"],
            registry=registry,
        )
        for key in DETECTOR_GAUGES:
            self.detector_values[key].set(float("nan"))
        for name in DETECTORS:
            self.detector_firing.labels(detector=name).set(0)

    def record_detector_bounds(self, bounds: dict[str, float]) -> None:
        for field, value in bounds.items():
            self.detector_bound.labels(bound=field).set(value)

    def record_detectors(self, values: DetectorValues, firing: dict[str, bool]) -> None:
        for key, gauge in self.detector_values.items():
            gauge.set(getattr(values, key))
        for name, on in firing.items():
            self.detector_firing.labels(detector=name).set(1 if on else 0)

    def record_step(self, record: StepRecord) -> None:
        for key in STATS_GAUGES:
            self.gauges[key].set(getattr(record.stats, key))
        self.gauges["version"].set(record.version)
        self.steps.inc()
        for name, mean in record.reward_components.items():
            self.reward_components.labels(component=name).set(mean)
        current = set(record.reward_model_ids)
        self.reward_models_seen |= current
        for model_id in self.reward_models_seen:  # a swapped reward service shows as a change here
            self.reward_model.labels(reward_model_id=model_id).set(1 if model_id in current else 0)
        self.consumed.inc(record.rollouts)
        seconds = record.seconds
        self.step_seconds.observe(seconds.update + seconds.publish + seconds.persist)
        self.last_step.set_to_current_time()

    def record_publication(self, publication) -> None:
        self.publish_seconds.labels(transport=publication.transport).observe(publication.seconds)
        self.publish_bytes.labels(transport=publication.transport).set(publication.bytes)

    def watch_transport(self, transport) -> None:
        """belay_trainer_replica_drops_total{transport}, read from the transport at each scrape."""
        self.registry.register(ReplicaDrops(transport))

    def watch_persister(self, persister, every_steps: int, every_seconds: float) -> None:
        """Gauges read from the persister whenever /metrics is scraped."""
        self.persist_interval.labels(unit="steps").set(every_steps)
        self.persist_interval.labels(unit="seconds").set(every_seconds)
        self.updates_since_persist.set_function(lambda: persister.updates_since)
        self.seconds_since_persist.set_function(persister.seconds_since)
        self.persisted_version.set_function(lambda: persister.persisted_version)

    def watch_loss_scale(self, loss_scale) -> None:
        """belay_trainer_loss_scale and belay_trainer_loss_scale_overflows_total, read at each scrape."""
        self.loss_scale.source = loss_scale


class LossScaleFigures:
    """A collector: the float16 loss scale S (1 when the trainer is not float16: nothing is scaled) and
    how many optimizer steps it skipped since the trainer started because the scaled gradients
    overflowed float16 (each halving S). A few while S settles after a start are expected; these are
    not belay_trainer_nonfinite_skips_total, which counts NaN/Inf losses and unscaled overflows."""

    def __init__(self):
        self.source = None  # the trainer's LossScale (loss_scale.py); None: S = 1, no overflow yet

    def collect(self):
        source = self.source
        yield GaugeMetricFamily(
            "belay_trainer_loss_scale",
            "float16 dynamic loss scale S (1: off)",
            value=source.scale if source is not None else 1.0,
        )
        yield CounterMetricFamily(
            "belay_trainer_loss_scale_overflows",
            "Optimizer steps skipped because float16 gradients overflowed at loss scale S > 1 (S halved)",
            value=source.overflows if source is not None else 0,
        )


class ReplicaDrops:
    """A collector: how many sends of a version to a policy replica failed since the trainer started
    (broadcast and cuda_ipc; the file transport sends to nobody). Each such replica keeps serving
    its older weights until a catch-up reaches it, so a count that keeps rising means a replica
    that never gets new weights."""

    def __init__(self, transport):
        self.transport = transport

    def collect(self):
        family = CounterMetricFamily(
            "belay_trainer_replica_drops",
            "Sends of a version to a policy replica that failed (that replica is caught up later)",
            labels=["transport"],
        )
        family.add_metric([self.transport.name], self.transport.drops)
        yield family
