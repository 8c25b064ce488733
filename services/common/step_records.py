"""The trainer's record of each step: built once per step by the trainer, read by attribute in the
trainer's own metrics and detectors, and written to the run's Redis steps stream
(belay:<run>:steps), where the launcher, the bench and the run report read it back as the same
typed object. Like the rollout, it is a contract between services, so it lives in common/.

On the wire each record is one strict JSON object: the update's figures and the detectors' values
at the top level, `seconds` and `sample` nested, a rollback marked by "event": "rollback" (the
field names dashboards and scripts already read). A value that is not finite (NaN, ±inf: a
detector before its window is full, the loss of an update whose every minibatch was skipped) is
written as null, since strict JSON readers refuse NaN, and read back as NaN: in-process, NaN is
the one spelling of "no value" (it compares false, so nothing fires or alerts on it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

from .strict_json import strict_json

NAN = float("nan")


@dataclass
class UpdateStats:
    """What one PPO update saw and did (services/trainer/update.py)."""

    kl_per_token: float  # mean k1 KL(policy || reference) per response token of the batch, nats
    kl_per_sequence: float  # mean KL per response, nats
    kl_coef: float  # β this update paid
    kl_coef_next: float  # β for the next update (the adaptive controller moves it)
    reward_mean: float  # the raw reward of the batch
    reward_std: float  # its spread (population standard deviation)
    shaped_reward_mean: float  # after normalisation, clipping, length normalisation, truncation, overlong penalties
    total_reward_mean: float  # shaped reward − β·KL
    response_length_mean: float  # tokens
    eos_fraction: float  # share of responses that ended with EOS (the rest were truncated)
    reward_length_correlation: float  # Pearson's r of reward and length: a length bias
    distinct_2: float  # distinct word bigrams / all bigrams over the batch's responses
    repetition_3: float  # mean share of repeated word trigrams within a response
    entropy: float  # mean policy entropy per response token, nats (minibatch mean; NaN: none stepped)
    clip_fraction: float  # share of response tokens whose ratio was clipped
    approx_kl: float  # k3 estimate of KL(old policy || new policy) during the update
    loss: float  # the clipped PPO loss (+ KL, − entropy bonus and value terms where configured)
    grad_norm: float  # before clipping
    value_loss: float  # the critic's clipped loss (GAE only; NaN otherwise)
    lr: float  # the learning rate after the update's optimizer steps
    first_minibatch_max_log_ratio: float  # 0 on fresh rollouts: a check on the whole pipeline
    logprob_mismatch_mean_abs: float  # mean |log pi_trainer_old - log pi_behaviour| (NaN: not measured)
    logprob_mismatch_k3: float  # k3 estimate of KL(pi_behaviour || pi_trainer_old) (NaN: not measured)
    early_stopped: bool  # approx_kl passed early_stop_kl
    optimizer_steps: int  # 0: every minibatch was non-finite, nothing to publish
    skipped_minibatches: int  # minibatches skipped for a non-finite loss or gradient (float16 overflows too)
    out_of_memory: bool = False  # a CUDA out-of-memory cut the update short


@dataclass
class StageSeconds:
    """Seconds per stage: the trainer's own (update, publish, persist: the critical path;
    persist_background: the last background write) and the batch's mean of the rollouts' stages."""

    update: float = 0.0
    publish: float = 0.0
    persist: float = 0.0  # the snapshot's copies plus any wait for the previous persist; 0 when none was due
    persist_background: float = 0.0
    generate: float = 0.0
    logprobs: float = 0.0
    reference: float = 0.0
    reward: float = 0.0
    queue: float = 0.0
    swap: float = 0.0


@dataclass
class DetectorValues:
    """The failure detectors' numbers (services/trainer/detectors.py); NaN until the window is full."""

    reward_slope: float = NAN
    reward_rise_ratio: float = NAN
    response_length_ratio: float = NAN
    cross_prompt_similarity: float = NAN
    kl_per_sequence_window_max: float = NAN


@dataclass
class Sample:
    """The batch's first rollout, for a glance at what the policy says."""

    prompt: str
    response: str
    reward: float


@dataclass
class StepRecord:
    """One published update."""

    version: int  # the version it was published as
    time: float  # Unix time the record was made
    rollouts: int
    rollout_versions: list[int]  # the versions that sampled the batch
    reward_model_ids: list[str]
    reward_components: dict[str, float]  # mean of each part of a combined reward
    publish_bytes: int
    persisted_version: int  # newest version in a committed checkpoint
    stats: UpdateStats
    seconds: StageSeconds
    sample: Sample
    detectors: DetectorValues = field(default_factory=DetectorValues)
    detectors_firing: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = {**dataclasses.asdict(self.stats), **dataclasses.asdict(self.detectors)}
        for f in dataclasses.fields(self):
            if f.name not in ("stats", "detectors"):
                value = getattr(self, f.name)
                data[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return strict_json(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> StepRecord:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> StepRecord:
        return cls(
            version=data["version"],
            time=data["time"],
            rollouts=data["rollouts"],
            rollout_versions=data.get("rollout_versions", []),
            reward_model_ids=data.get("reward_model_ids", []),
            reward_components={k: _float(v) for k, v in data.get("reward_components", {}).items()},
            publish_bytes=data.get("publish_bytes", 0),
            persisted_version=data.get("persisted_version", 0),
            stats=_build(UpdateStats, data),
            seconds=_build(StageSeconds, data.get("seconds", {})),
            sample=_build(Sample, data.get("sample", {"prompt": "", "response": "", "reward": None})),
            detectors=_build(DetectorValues, data),
            detectors_firing=data.get("detectors_firing", []),
        )


@dataclass
class RollbackRecord:
    """A rail tripped (services/trainer/rails.py): the KL one, or the canary one; the weights of
    `rolled_back_to` went out again as `version`, with β raised or the learning rate lowered."""

    event: ClassVar[str] = "rollback"
    version: int
    rolled_back_to: int
    batch_kl: float  # mean KL per response of the refused batch, nats
    kl_coef: float  # β from now on
    lr: float  # the learning rate from now on
    time: float
    cause: str = "kl_hard_limit"  # or "canary_degenerate" (trainer.rollback_on_degenerate)
    degenerate_version: int | None = None  # the version whose canary answers were degenerate

    def to_json(self) -> str:
        return strict_json({"event": self.event, **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, text: str | bytes) -> RollbackRecord:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> RollbackRecord:
        return _build(cls, data)


TrainerRecord = StepRecord | RollbackRecord


def record_from_json(text: str | bytes) -> TrainerRecord:
    """A step or a rollback, as the trainer wrote it to the steps stream."""
    data = json.loads(text)
    return RollbackRecord.from_dict(data) if data.get("event") == RollbackRecord.event else StepRecord.from_dict(data)


def _float(value: float | None) -> float:
    return NAN if value is None else float(value)


def _build(cls, data: dict):
    """An instance of dataclass `cls` from the keys of `data` it names (others ignored): a float
    field written as null comes back as NaN; a missing one takes its default (NaN with none)."""
    values = {}
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.name in data:
            value = data[f.name]
            values[f.name] = _float(value) if f.type == "float" else value
        elif not has_default and f.type == "float":
            values[f.name] = NAN
    return cls(**values)
