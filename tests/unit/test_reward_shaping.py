"""Reward shaping (services/trainer/reward_shaping.py) checked against the formulas written out by hand
and, for the running moments, against numpy over the concatenated batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.trainer.reward_shaping import (
    RunningMoments,
    clip_reward,
    length_normalised_reward,
    overlong_penalty,
    truncation_penalty,
)


def t(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# --- clip_reward ------------------------------------------------------------------------------


def test_clip_reward_clamps_to_plus_minus_limit_and_leaves_the_rest():
    rewards = [-10.0, -2.0, -1.999, 0.0, 1.5, 2.0, 3.0, 1e9]
    got = clip_reward(t(rewards), 2.0)
    assert got.shape == (8,)
    assert got.tolist() == [max(-2.0, min(2.0, r)) for r in rewards]
    assert got.tolist() == [-2.0, -2.0, -1.999, 0.0, 1.5, 2.0, 2.0, 2.0]


@pytest.mark.parametrize("limit", [0.0, -1.0])
def test_clip_reward_refuses_a_non_positive_limit(limit):
    with pytest.raises(ValueError, match="limit"):
        clip_reward(t([1.0]), limit)


# --- RunningMoments ---------------------------------------------------------------------------


def test_running_moments_batch_by_batch_equals_numpy_over_the_concatenation():
    batches = [[1.0, 2.0, 3.0], [10.0], [-4.0, 0.5, 7.25, 7.25, 100.0], [3.0, 3.0]]
    moments = RunningMoments()
    seen = []
    for batch in batches:
        moments.update(t(batch))
        seen.extend(batch)
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(float(np.mean(seen)), rel=1e-12)
        assert moments.std == pytest.approx(float(np.std(seen)), rel=1e-12)  # numpy's default: population


def test_running_moments_accepts_any_shape_and_dtype():
    moments = RunningMoments()
    moments.update(torch.tensor([[1, 2], [3, 4]], dtype=torch.int64))
    moments.update(torch.tensor([5.0, 6.0], dtype=torch.float32))
    assert moments.count == 6
    assert moments.mean == pytest.approx(3.5, rel=1e-12)
    assert moments.std == pytest.approx(float(np.std([1, 2, 3, 4, 5, 6])), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20), min_size=1, max_size=8))
def test_running_moments_matches_numpy_for_any_batches(batches):
    moments = RunningMoments()
    for batch in batches:
        moments.update(t(batch))
    everything = np.concatenate([np.asarray(batch, dtype=np.float64) for batch in batches])
    assert moments.count == everything.size
    assert moments.mean == pytest.approx(float(everything.mean()), rel=1e-9, abs=1e-9)
    assert moments.std == pytest.approx(float(everything.std()), rel=1e-7, abs=1e-7)


def test_running_moments_ignores_empty_batches_and_refuses_non_finite_values():
    moments = RunningMoments()
    moments.update(t([1.0, 3.0]))
    moments.update(t([]))
    assert (moments.count, moments.mean, moments.std) == (2, 2.0, 1.0)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="non-finite"):
            moments.update(t([0.0, bad]))
    assert (moments.count, moments.mean, moments.std) == (2, 2.0, 1.0)


def test_running_moments_state_dict_is_json_and_continues_identically():
    original = RunningMoments()
    original.update(t([1.0, -2.0, 4.5]))
    original.update(t([0.25, 8.0]))
    state = json.loads(json.dumps(original.state_dict()))
    restored = RunningMoments()
    restored.update(t([999.0]))  # stale state is replaced, not merged
    restored.load_state_dict(state)
    assert (restored.count, restored.mean, restored.std) == (original.count, original.mean, original.std)
    for batch in ([3.0, 3.0, -7.0], [0.5]):
        original.update(t(batch))
        restored.update(t(batch))
    assert (restored.count, restored.mean, restored.std) == (original.count, original.mean, original.std)
    everything = [1.0, -2.0, 4.5, 0.25, 8.0, 3.0, 3.0, -7.0, 0.5]
    assert restored.mean == pytest.approx(float(np.mean(everything)), rel=1e-12)
    assert restored.std == pytest.approx(float(np.std(everything)), rel=1e-12)


def test_running_moments_load_refuses_negative_count_or_m2():
    moments = RunningMoments()
    with pytest.raises(ValueError):
        moments.load_state_dict({"count": -1, "mean": 0.0, "m2": 0.0})
    with pytest.raises(ValueError):
        moments.load_state_dict({"count": 3, "mean": 0.0, "m2": -1.0})


def test_normalise_subtracts_mean_and_divides_by_population_std():
    moments = RunningMoments()
    seen = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]  # mean 5, population std 2
    moments.update(t(seen[:3]))
    moments.update(t(seen[3:]))
    values = [5.0, 9.0, 1.0, 6.0]
    got = moments.normalise(t(values))
    assert got.tolist() == pytest.approx([(v - 5.0) / 2.0 for v in values], abs=1e-12)
    assert got.tolist() == pytest.approx([0.0, 2.0, -2.0, 0.5], abs=1e-12)
    assert moments.normalise(t(values, torch.float32)).dtype == torch.float32


def test_normalise_uses_eps_when_the_std_is_zero():
    moments = RunningMoments()
    moments.update(t([3.0, 3.0, 3.0]))
    assert moments.std == 0.0
    got = moments.normalise(t([3.0, 3.5]), eps=0.25)
    assert got.tolist() == [0.0, 2.0]
    assert torch.isfinite(moments.normalise(t([3.0, 4.0]))).all()


def test_normalise_before_any_update_is_refused():
    with pytest.raises(ValueError, match="before any update"):
        RunningMoments().normalise(t([1.0]))


# --- length normalisation ---------------------------------------------------------------------


def test_length_normalised_reward_divides_each_reward_by_its_length():
    rewards = [3.0, -2.0, 0.5, 10.0]
    lengths = [3, 4, 1, 32]
    got = length_normalised_reward(t(rewards), torch.tensor(lengths))
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([r / n for r, n in zip(rewards, lengths)], abs=1e-15)
    assert got.tolist() == pytest.approx([1.0, -0.5, 0.5, 0.3125], abs=1e-15)


@pytest.mark.parametrize("lengths", [[3, 0, 2], [1, -1, 4], [0.5, 1.0, 1.0]])
def test_length_normalised_reward_refuses_lengths_below_one(lengths):
    with pytest.raises(ValueError, match="length"):
        length_normalised_reward(t([1.0, 1.0, 1.0]), t(lengths))


def test_length_normalised_reward_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        length_normalised_reward(t([1.0, 2.0]), torch.tensor([1, 2, 3]))


# --- truncation penalty -----------------------------------------------------------------------


def test_truncation_penalty_subtracts_penalty_only_from_truncated_responses():
    rewards = [1.0, 0.5, -0.25, 2.0]
    truncated = [True, False, True, False]
    got = truncation_penalty(t(rewards), torch.tensor(truncated), 0.75)
    assert got.tolist() == pytest.approx([r - 0.75 if tr else r for r, tr in zip(rewards, truncated)], abs=1e-15)
    assert got.tolist() == pytest.approx([0.25, 0.5, -1.0, 2.0], abs=1e-15)
    assert truncation_penalty(t(rewards), torch.tensor(truncated), 0.0).tolist() == rewards


def test_truncation_penalty_wants_a_bool_mask_of_the_same_shape():
    with pytest.raises(TypeError, match="bool"):
        truncation_penalty(t([1.0, 2.0]), torch.tensor([1, 0]), 1.0)
    with pytest.raises(ValueError):
        truncation_penalty(t([1.0, 2.0]), torch.tensor([True]), 1.0)


# --- overlong penalty (DAPO) ----------------------------------------------------------------------


def dapo_length_reward(length: int, max_length: int, cache: int) -> float:
    """Yu et al. 2025 (DAPO), eq. 13, as the paper writes it, case by case."""
    if length <= max_length - cache:
        return 0.0
    if length <= max_length:
        return ((max_length - cache) - length) / cache
    return -1.0


def test_overlong_penalty_follows_dapos_soft_overlong_punishment_length_by_length():
    lengths = list(range(1, 31))  # before the band, across it, at the cap, past it
    rewards = [0.1 * i - 1.0 for i in lengths]
    got = overlong_penalty(t(rewards), t(lengths), max_length=24, band=8, coef=0.5)
    expected = [r + 0.5 * dapo_length_reward(n, 24, 8) for r, n in zip(rewards, lengths)]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert got[15].item() == pytest.approx(rewards[15])  # length 16 = L_max - L_cache: still free
    assert got[16].item() == pytest.approx(rewards[16] - 0.5 / 8)  # one token into the band
    assert got[23].item() == pytest.approx(rewards[23] - 0.5)  # at the cap: the whole coefficient


@given(
    st.lists(st.integers(1, 200), min_size=1, max_size=16),
    st.integers(1, 150),
    st.integers(1, 150),
    st.floats(0.0, 4.0),
)
@settings(max_examples=60, deadline=None)
def test_overlong_penalty_matches_the_formula_for_any_lengths(lengths, max_length, cache, coef):
    cache = min(cache, max_length)
    rewards = [0.0] * len(lengths)
    got = overlong_penalty(t(rewards), t(lengths), max_length, cache, coef)
    assert got.tolist() == pytest.approx([coef * dapo_length_reward(n, max_length, cache) for n in lengths], abs=1e-9)


def test_overlong_penalty_refuses_a_band_outside_one_to_the_cap_and_mismatched_shapes():
    with pytest.raises(ValueError, match="band"):
        overlong_penalty(t([1.0]), t([3.0]), max_length=8, band=9, coef=1.0)
    with pytest.raises(ValueError, match="band"):
        overlong_penalty(t([1.0]), t([3.0]), max_length=8, band=0, coef=1.0)
    with pytest.raises(ValueError, match="same"):
        overlong_penalty(t([1.0, 2.0]), t([3.0]), max_length=8, band=2, coef=1.0)
