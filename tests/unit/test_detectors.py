"""The failure detectors' values against their formulas, computed here independently; NaN until the
window fills; each detector firing, and not, on windows built for it."""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np
import pytest
import yaml

from services.common.config import ConfigError, TrainerConfig, load_config
from services.trainer.detectors import (
    DETECTORS,
    RUNBOOK,
    Detectors,
    WindowedUpdate,
    cross_prompt_similarity,
    detector_values,
    detectors_firing,
    least_squares_slope,
)
from tests.step_records import make_update_stats

RULES = pathlib.Path(__file__).resolve().parents[2] / "deploy/prometheus/rules/belay.yml"
BOUNDS = {
    "detector_kl_bound": 6.0,
    "detector_length_ratio": 0.5,
    "detector_similarity_bound": 0.5,
    "detector_still_kl": 0.05,
    "detector_flat_reward": 2.0,
}


def record(reward=0.0, std=1.0, kl=1.0, length=20.0, similarity=0.1) -> WindowedUpdate:
    return WindowedUpdate(
        reward_mean=reward, reward_std=std, kl_per_sequence=kl, response_length_mean=length, similarity=similarity
    )


def test_slope_is_numpys_least_squares_fit():
    values = [0.3, 0.1, 0.9, 1.4, 1.2, 2.0]
    assert least_squares_slope(values) == pytest.approx(np.polyfit(np.arange(6), values, 1)[0])
    assert least_squares_slope([5.0, 5.0, 5.0]) == 0.0
    assert math.isnan(least_squares_slope([1.0]))


def test_cross_prompt_similarity_is_the_mean_jaccard_of_word_grams_over_pairs_of_different_prompts():
    prompts = ["p", "p", "q"]
    responses = ["a b c", "a b c", "a b d"]
    # by hand: {a, b, c, ab, bc} vs {a, b, d, ab, bd}: 3 shared of 7 -> 3/7, for pairs (0,2) and (1,2);
    # the pair (0,1) answers one prompt and is left out
    assert cross_prompt_similarity(prompts, responses) == pytest.approx(3 / 7)
    assert cross_prompt_similarity(["p", "q"], ["same words here", "same words here"]) == 1.0
    assert cross_prompt_similarity(["p", "q"], ["one", "two"]) == 0.0
    assert math.isnan(cross_prompt_similarity(["p", "q"], ["", " "]))  # nothing to compare
    assert math.isnan(cross_prompt_similarity(["p", "p"], ["a", "b"]))  # no pair of different prompts


def test_values_are_nan_until_the_window_is_full():
    window = [record(), record()]
    assert all(math.isnan(v) for v in dataclasses.astuple(detector_values(window, None, 3)))
    assert not any(detectors_firing(detector_values(window, None, 3), 100.0, BOUNDS).values())


def test_values_against_their_formulas():
    window = [
        record(reward=r, std=s, kl=k, length=n, similarity=m)
        for r, s, k, n, m in [(0.0, 0.5, 0.2, 20, 0.1), (0.5, 0.3, 0.4, 16, math.nan), (0.7, 0.4, 0.1, 12, 0.3)]
    ]
    values = detector_values(window, baseline_length=24.0, size=3)
    slope = np.polyfit([0, 1, 2], [0.0, 0.5, 0.7], 1)[0]
    assert values.reward_slope == pytest.approx(slope)
    assert values.reward_rise_ratio == pytest.approx(slope * 2 / np.mean([0.5, 0.3, 0.4]))
    assert values.response_length_ratio == pytest.approx(np.mean([20, 16, 12]) / 24)
    assert values.cross_prompt_similarity == pytest.approx(0.2)  # the NaN batch is left out
    assert values.kl_per_sequence_window_max == 0.4


def test_reward_rise_over_no_spread_is_infinite_or_zero():
    rising = [record(reward=r, std=0.0) for r in (0.0, 1.0, 2.0)]
    flat = [record(reward=1.0, std=0.0)] * 3
    assert detector_values(rising, 20.0, 3).reward_rise_ratio == math.inf
    assert detector_values(flat, 20.0, 3).reward_rise_ratio == 0.0


CASES = {  # detector -> (window that provokes it, its last KL, healthy window, its last KL)
    "reward_hacking": (
        [record(reward=r, kl=8.0) for r in (0.1, 0.2, 0.4)],
        8.0,
        [record(reward=r, kl=8.0) for r in (0.4, 0.2, 0.1)],
        8.0,
    ),  # KL high but reward falling
    "shorter_responses": ([record(length=n) for n in (8, 6, 4)], 1.0, [record(length=n) for n in (18, 16, 14)], 1.0),
    "template_collapse": ([record(similarity=0.8)] * 3, 1.0, [record(similarity=0.2)] * 3, 1.0),
    "not_moving": (
        [record(reward=r, kl=0.01) for r in (0.5, 0.4, 0.5)],
        0.01,
        [record(reward=r, std=0.1, kl=0.01) for r in (0.1, 0.5, 0.9)],
        0.01,
    ),  # still KL, rising reward
}


@pytest.mark.parametrize("detector", DETECTORS)
def test_each_detector_fires_on_its_failure_and_not_on_a_healthy_window(detector):
    bad, bad_kl, good, good_kl = CASES[detector]
    fired = detectors_firing(detector_values(bad, 20.0, 3), bad_kl, BOUNDS)
    assert [name for name, on in fired.items() if on] == [detector]
    assert not any(detectors_firing(detector_values(good, 20.0, 3), good_kl, BOUNDS).values())


def test_detectors_keep_the_first_window_as_baseline_and_report_when_one_starts_firing():
    detectors = Detectors(3, BOUNDS)
    prompts, responses = ["p", "q"], ["an answer", "another reply"]
    started = []
    for length in (20, 20, 20, 12, 8, 4, 4):
        summary = {"reward_mean": 0.0, "reward_std": 1.0, "kl_per_sequence": 1.0, "response_length_mean": length}
        values, firing, new = detectors.observe(make_update_stats(**summary), prompts, responses)
        started.append(new)
    assert detectors.baseline_length == 20
    assert values.response_length_ratio == pytest.approx(np.mean([8, 4, 4]) / 20)
    assert firing["shorter_responses"]
    # it started firing at the 6th update (mean 8 / 20 = 0.4) and is not reported again at the 7th
    assert started == [[], [], [], [], [], ["shorter_responses"], []]


def test_the_alert_rules_carry_the_detectors_runbook_lines():
    rules = {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    alerts = {
        "reward_hacking": "BelayRewardHacking",
        "shorter_responses": "BelayResponsesShrinking",
        "template_collapse": "BelayTemplateCollapse",
        "not_moving": "BelayPolicyNotMoving",
    }
    for detector, alert in alerts.items():
        assert rules[alert]["annotations"]["runbook"] == RUNBOOK[detector]
        assert "belay_trainer_detector_firing" not in rules[alert]["expr"]  # the rules read the values


def test_bad_detector_bounds_are_refused_naming_the_field():
    assert TrainerConfig().detector_window == 6
    with pytest.raises(ConfigError, match="trainer.detector_length_ratio"):
        load_config(environ={"BELAY_TRAINER__DETECTOR_LENGTH_RATIO": "1.5"})
    with pytest.raises(ConfigError, match="trainer.detector_window"):
        load_config(environ={"BELAY_TRAINER__DETECTOR_WINDOW": "1"})
