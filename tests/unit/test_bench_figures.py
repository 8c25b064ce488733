"""The bench's figures from its raw steps (BenchStep, the same record in every mode), each against its
definition computed here by hand, and the record's own checks."""

import json
import math

import pytest

from services.bench.bench_step import STAGES, BenchStep
from services.bench.figures import mode_figures
from services.common.strict_json import strict_json


def step(version: int, end_time: float, **seconds: float) -> BenchStep:
    return BenchStep(
        version=version,
        end_time=end_time,
        rollouts=8,
        response_tokens=100 * version,
        rollout_versions=[version - 1],
        optimizer_steps=2,
        publish_bytes=1000 * version,
        persisted_version=version - 1,
        persist_background_seconds=0.0,
        seconds={stage: seconds.get(stage, 0.0) for stage in STAGES},
    )


def raw_run(steps: list[BenchStep], warmup: int, measured_from: float) -> dict:
    """A raw run as a mode returns it, through JSON like the in-process mode's."""
    run = {
        "steps": [s.to_dict() for s in steps],
        "measured_from": measured_from,
        "warmup": warmup,
        "peak_memory_bytes": {"trainer": 5},
        "checkpoint_every_steps": 2,
        "persist_writes_seconds": {"2": 0.5, "4": 1.5},
    }
    return json.loads(strict_json(run))


def test_mode_figures_follow_their_definitions_over_the_measured_steps_only():
    steps = [
        step(1, 10.0, generation=99.0, publish=99.0),  # warm-up: in no figure
        step(2, 12.0, generation=1.0, update=0.5, publish=0.25, hot_swap=0.1),
        step(3, 16.0, generation=3.0, update=1.5, publish=0.75, persist=0.2),
    ]
    figures = mode_figures(raw_run(steps, warmup=1, measured_from=10.0))
    wall = 16.0 - 10.0
    assert figures["steps_measured"] == 2 and figures["rollouts_measured"] == 16
    assert figures["seconds_per_step"] == wall / 2 and figures["samples_per_second"] == 16 / wall
    assert figures["tokens_per_second"] == (200 + 300) / wall
    assert figures["generation_seconds"] == 2.0 and figures["update_seconds"] == 1.0
    total = (1.0 + 0.5 + 0.25 + 0.1 + 3.0 + 1.5 + 0.75 + 0.2) / 2
    assert math.isclose(figures["stage_seconds_sum"], total)
    assert math.isclose(figures["generation_share"], 2.0 / total)
    assert figures["hot_swap_seconds_per_swap"] == 0.1  # the one measured step that swapped
    assert figures["publish_bytes_per_second"] == (2000 + 3000) / (0.25 + 0.75)
    assert figures["persists_measured"] == 1 and figures["persist_background_seconds_per_persist"] == 1.0
    assert figures["persist_background_seconds_per_update"] == 0.5
    assert figures["steps"][0]["seconds"]["generation"] == 99.0  # every raw step is kept


def test_a_run_without_measured_steps_is_refused():
    with pytest.raises(ValueError, match="no measured steps"):
        mode_figures(raw_run([step(1, 1.0)], warmup=1, measured_from=0.0))


def test_a_bench_step_must_time_every_stage():
    with pytest.raises(ValueError, match="expected"):
        BenchStep(3, 1.0, 8, 10, [2], 1, 0, 0, 0.0, seconds={"generation": 1.0})
    assert BenchStep.from_dict(step(2, 1.0).to_dict()) == step(2, 1.0)
