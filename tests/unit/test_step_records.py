"""The trainer's step records on the wire: strict JSON (no NaN or inf: null), the field names
dashboards read, and the typed record back (null read as NaN)."""

import json
import math

from services.common.step_records import (
    DetectorValues,
    RollbackRecord,
    StepRecord,
    record_from_json,
)
from tests.step_records import make_step_record
from tests.strict_json import strict_loads


def test_a_nan_reward_std_is_written_as_null_and_read_back_as_nan():
    record = make_step_record(3, time=5.0, reward_mean=0.5, reward_std=float("nan"), loss=0.1)
    text = record.to_json()
    data = strict_loads(text)
    assert data["reward_std"] is None and data["reward_mean"] == 0.5
    back = StepRecord.from_json(text)
    assert math.isnan(back.stats.reward_std) and back.stats.reward_mean == 0.5 and back.version == 3


def test_infinities_anywhere_are_written_as_null():
    record = make_step_record(1, reward_mean=0.0)
    record.detectors = DetectorValues(reward_rise_ratio=math.inf, reward_slope=-math.inf)
    record.reward_components = {"polite": math.nan, "short": 1.0}
    data = strict_loads(record.to_json())
    assert data["reward_rise_ratio"] is None and data["reward_slope"] is None
    assert data["reward_components"] == {"polite": None, "short": 1.0}
    back = StepRecord.from_json(record.to_json())
    assert math.isnan(back.detectors.reward_rise_ratio) and math.isnan(back.reward_components["polite"])


def test_the_wire_keeps_the_field_names_readers_know():
    record = make_step_record(
        7, time=1.0, seconds={"update": 2.0, "swap": 0.5}, detectors_firing=["not_moving"], kl_per_sequence=0.3
    )
    data = strict_loads(record.to_json())
    for key in ("version", "time", "rollouts", "kl_per_sequence", "reward_mean", "optimizer_steps", "lr"):
        assert key in data  # the update's figures at the top level, as before the records were typed
    assert data["seconds"]["update"] == 2.0 and data["seconds"]["swap"] == 0.5
    assert data["sample"] == {"prompt": "p", "response": "r", "reward": 0.0}
    assert data["detectors_firing"] == ["not_moving"] and "kl_per_sequence_window_max" in data
    assert "stats" not in data and "detectors" not in data and "event" not in data


def test_a_step_record_survives_the_round_trip():
    record = make_step_record(4, time=2.0, seconds={"publish": 0.25}, reward_mean=0.1, reward_std=0.2, loss=0.3)
    back = record_from_json(record.to_json())
    assert isinstance(back, StepRecord)
    assert back.to_json() == record.to_json()


def test_a_rollback_is_marked_and_comes_back_as_a_rollback():
    rollback = RollbackRecord(version=5, rolled_back_to=2, batch_kl=30.0, kl_coef=0.2, lr=1e-5, time=9.0)
    data = strict_loads(rollback.to_json())
    assert data == {
        "event": "rollback",
        "version": 5,
        "rolled_back_to": 2,
        "batch_kl": 30.0,
        "kl_coef": 0.2,
        "lr": 1e-5,
        "time": 9.0,
        "cause": "kl_hard_limit",
        "degenerate_version": None,
    }
    assert record_from_json(rollback.to_json()) == rollback
    # a record written before rollbacks had causes reads as the KL rail's
    older = {k: v for k, v in data.items() if k not in ("cause", "degenerate_version")}
    assert record_from_json(json.dumps(older)) == rollback
    canary = RollbackRecord(5, 2, 0.4, 0.2, 1e-5, 9.0, cause="canary_degenerate", degenerate_version=4)
    assert record_from_json(canary.to_json()) == canary
