"""Step records for tests of their readers: only the figures a test names, the rest NaN or zero."""

from __future__ import annotations

import dataclasses

from services.common.step_records import Sample, StageSeconds, StepRecord, UpdateStats

NAN = float("nan")


def make_update_stats(**figures) -> UpdateStats:
    defaults = {f.name: NAN for f in dataclasses.fields(UpdateStats)}
    defaults.update(early_stopped=False, optimizer_steps=1, skipped_minibatches=0)
    return UpdateStats(**{**defaults, **figures})


def make_step_record(
    version: int, time: float = 0.0, seconds: dict | None = None, detectors_firing: list[str] | None = None, **figures
) -> StepRecord:
    """A published update's record; `figures`: UpdateStats fields."""
    return StepRecord(
        version=version,
        time=time,
        rollouts=8,
        rollout_versions=[version - 1],
        reward_model_ids=["test-reward"],
        reward_components={},
        publish_bytes=0,
        persisted_version=0,
        stats=make_update_stats(**figures),
        seconds=StageSeconds(**(seconds or {})),
        sample=Sample("p", "r", 0.0),
        detectors_firing=list(detectors_firing or []),
    )
