"""Advantage estimators (services/trainer/advantages.py) and the value head, checked against the
formulas written out by hand.

Every expected value here is computed with plain Python loops over the definition, never by
calling the function under test a second time.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from services.trainer.advantages import (
    ADVANTAGE_ESTIMATORS,
    batch_mean_advantage,
    gae_advantages,
    group_advantage,
    rloo_advantage,
    sequence_advantage_to_tokens,
    token_rewards,
    whiten,
)
from services.trainer.value_head import ValueHead
from tests.token_batches import FINITE, ragged, rows_mask, t, with_junk

UNIT = st.floats(0.0, 1.0, exclude_min=True)  # gamma, lam in (0, 1]


def assert_close_rows(got: torch.Tensor, expected, abs_tol=1e-9):
    assert tuple(got.shape) == (len(expected), len(expected[0]))
    for b, row in enumerate(expected):
        for i, value in enumerate(row):
            assert got[b, i].item() == pytest.approx(value, abs=abs_tol, rel=1e-9), (b, i)


def test_estimator_names():
    assert ADVANTAGE_ESTIMATORS == ("batch_mean", "group", "rloo", "gae")


# --- batch mean -----------------------------------------------------------------------------


def test_batch_mean_advantage_matches_hand_and_sums_to_zero():
    rewards = [3.0, -1.0, 0.5, 2.5, 7.0]
    mean = sum(rewards) / len(rewards)
    got = batch_mean_advantage(t(rewards))
    assert got.tolist() == pytest.approx([r - mean for r in rewards], abs=1e-12)
    assert got.sum().item() == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=16))
def test_batch_mean_advantage_always_sums_to_zero(rewards):
    got = batch_mean_advantage(t(rewards))
    assert got.sum().item() == pytest.approx(0.0, abs=1e-9 * max(1.0, max(abs(r) for r in rewards)) * len(rewards))


# --- group / GRPO / RLOO --------------------------------------------------------------------


def hand_group(rewards, groups, scale_by_std=False, eps=1e-6):
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        if scale_by_std:
            std = math.sqrt(sum((x - mean) ** 2 for x in members) / len(members))
            out.append((r - mean) / (std + eps))
        else:
            out.append(r - mean)
    return out


def hand_rloo(rewards, groups):
    out = []
    for i, r in enumerate(rewards):
        others = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i] and j != i]
        out.append(r - sum(others) / len(others) if others else 0.0)
    return out


# groups of sizes 3, 2, 1, interleaved, with labels that are not 0..G-1
REWARDS = [1.0, 4.0, -2.0, 5.0, 0.5, 3.0]
GROUPS = [7, 2, 7, 9, 2, 7]


def test_group_advantage_matches_hand_loop_on_unequal_groups():
    got = group_advantage(t(REWARDS), torch.tensor(GROUPS))
    assert got.tolist() == pytest.approx(hand_group(REWARDS, GROUPS), abs=1e-12)
    # group 7: rewards 1, -2, 3, mean 2/3; group 2: 4, 0.5, mean 2.25; group 9 alone: 0
    assert got.tolist() == pytest.approx([1 / 3, 1.75, -8 / 3, 0.0, -1.75, 7 / 3], abs=1e-12)


def test_group_advantage_scaled_by_population_std_matches_hand_loop():
    got = group_advantage(t(REWARDS), torch.tensor(GROUPS), scale_by_std=True, eps=1e-6)
    assert got.tolist() == pytest.approx(hand_group(REWARDS, GROUPS, True, 1e-6), abs=1e-12)
    # group 2 has population std 1.75: its two members become ~ +-1, not +-1/sqrt(2)
    assert got[1].item() == pytest.approx(1.75 / (1.75 + 1e-6), abs=1e-12)
    assert got[3].item() == 0.0  # singleton: std 0, centred 0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-100, 100, allow_nan=False), st.integers(0, 3)), min_size=1, max_size=12),
    st.booleans(),
)
def test_group_advantage_property(pairs, scale):
    rewards = [p[0] for p in pairs]
    groups = [p[1] for p in pairs]
    got = group_advantage(t(rewards), torch.tensor(groups), scale_by_std=scale)
    assert got.tolist() == pytest.approx(hand_group(rewards, groups, scale, 1e-6), abs=1e-6, rel=1e-9)
    for g in set(groups):
        members = [i for i in range(len(groups)) if groups[i] == g]
        assert sum(got[i].item() for i in members) == pytest.approx(0.0, abs=1e-6 * max(1.0, len(members)))


def test_rloo_matches_hand_loop_and_singleton_gets_zero():
    got = rloo_advantage(t(REWARDS), torch.tensor(GROUPS))
    assert got.tolist() == pytest.approx(hand_rloo(REWARDS, GROUPS), abs=1e-12)
    # reward 1 in group 7: others -2 and 3, baseline 0.5
    assert got[0].item() == pytest.approx(0.5, abs=1e-12)
    assert got[3].item() == 0.0  # group 9 has one member: no baseline, no advantage
    single = rloo_advantage(t([4.2]), torch.tensor([0]))
    assert single.tolist() == [0.0]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-100, 100, allow_nan=False), st.integers(0, 3)), min_size=1, max_size=12))
def test_rloo_property_and_identity_with_group_advantage(pairs):
    rewards = [p[0] for p in pairs]
    groups = [p[1] for p in pairs]
    got = rloo_advantage(t(rewards), torch.tensor(groups))
    assert got.tolist() == pytest.approx(hand_rloo(rewards, groups), abs=1e-9, rel=1e-9)
    centred = group_advantage(t(rewards), torch.tensor(groups))
    for i, g in enumerate(groups):
        n = groups.count(g)
        if n == 1:
            assert got[i].item() == 0.0
        else:  # R_i - mean_{j != i} R_j = n / (n - 1) * (R_i - mean_g)
            assert got[i].item() == pytest.approx(centred[i].item() * n / (n - 1), abs=1e-9, rel=1e-9)


# --- whiten ---------------------------------------------------------------------------------


def hand_whiten(values, mask, shift_mean=True, eps=1e-8):
    picked = [v for row, mrow in zip(values, mask) for v, m in zip(row, mrow) if m]
    mean = sum(picked) / len(picked)
    var = sum((v - mean) ** 2 for v in picked) / len(picked)
    out = []
    for row, mrow in zip(values, mask):
        out.append(
            [
                ((v - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)) if m else 0.0
                for v, m in zip(row, mrow)
            ]
        )
    return out, mean


WMASK = [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
WVALUES = [[9.0, 1.0, 2.0, 6.0, -3.0], [0.5, 4.5, 100.0, 7.0, 7.0]]


def test_whiten_matches_hand_and_gives_mean_zero_std_one_over_masked_entries():
    got = whiten(t(WVALUES), t(WMASK))
    expected, _ = hand_whiten(WVALUES, WMASK)
    assert_close_rows(got, expected)
    picked = [got[b, i].item() for b in range(2) for i in range(5) if WMASK[b][i]]
    mean = sum(picked) / len(picked)
    std = math.sqrt(sum((x - mean) ** 2 for x in picked) / len(picked))
    assert mean == pytest.approx(0.0, abs=1e-12)
    assert std == pytest.approx(1.0, abs=1e-6)
    for b in range(2):
        for i in range(5):
            if not WMASK[b][i]:
                assert got[b, i].item() == 0.0


def test_whiten_ignores_masked_entries_even_nan_and_inf():
    before = whiten(t(WVALUES), t(WMASK))
    after = whiten(t(with_junk(WVALUES, WMASK)), torch.tensor(WMASK, dtype=torch.bool))
    assert after.tolist() == before.tolist()


def test_whiten_without_shift_keeps_the_mean_and_without_mask_uses_everything():
    got = whiten(t(WVALUES), t(WMASK), shift_mean=False)
    expected, mean = hand_whiten(WVALUES, WMASK, shift_mean=False)
    assert_close_rows(got, expected)
    picked = [got[b, i].item() for b in range(2) for i in range(5) if WMASK[b][i]]
    assert sum(picked) / len(picked) == pytest.approx(mean, abs=1e-12)
    flat = [1.0, 2.0, 4.0, 9.0]
    full = whiten(t(flat))
    expected_full, _ = hand_whiten([flat], [[1, 1, 1, 1]])
    assert full.tolist() == pytest.approx(expected_full[0], abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(ragged(min_len=1))
def test_whiten_property(batch):
    mask, values, _ = batch
    picked = [v for row, mrow in zip(values, mask) for v, m in zip(row, mrow) if m]
    mean = sum(picked) / len(picked)
    assume(sum((v - mean) ** 2 for v in picked) / len(picked) > 1e-3)
    got = whiten(t(values), t(mask))
    expected, _ = hand_whiten(values, mask)
    assert_close_rows(got, expected, abs_tol=1e-7)
    out = [got[b, i].item() for b in range(len(mask)) for i in range(len(mask[0])) if mask[b][i]]
    out_mean = sum(out) / len(out)
    assert out_mean == pytest.approx(0.0, abs=1e-7)
    assert math.sqrt(sum((x - out_mean) ** 2 for x in out) / len(out)) == pytest.approx(1.0, abs=1e-4)


# --- token rewards --------------------------------------------------------------------------


def hand_token_rewards(score, kl, kl_coef, mask):
    out = []
    for b, mrow in enumerate(mask):
        row = [(-kl_coef * kl[b][i]) if m else 0.0 for i, m in enumerate(mrow)]
        response = [i for i, m in enumerate(mrow) if m]
        if response:
            row[response[-1]] += score[b]
        out.append(row)
    return out


# row 0: prompt 2, response 3, padding 1; row 1: prompt 1, response 5; row 2: response of 1 then padding;
# row 3: no response at all
TMASK = rows_mask([(2, 3), (1, 5), (0, 1), (3, 0)], 6)
KL = [
    [0.3, -0.2, 0.1, 0.4, -0.05, 2.0],
    [1.0, 0.2, 0.3, -0.1, 0.0, 0.25],
    [0.6, 0.7, 0.8, 0.9, 1.0, 1.1],
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
]
SCORE = [1.5, -2.0, 0.25, 9.0]


def test_token_rewards_puts_score_on_last_response_token_of_ragged_rows():
    got = token_rewards(t(SCORE), t(KL), 0.1, t(TMASK))
    assert_close_rows(got, hand_token_rewards(SCORE, KL, 0.1, TMASK), abs_tol=1e-12)
    assert got[0, 4].item() == pytest.approx(1.5 + 0.1 * 0.05, abs=1e-12)  # last of row 0 is position 4
    assert got[1, 5].item() == pytest.approx(-2.0 - 0.1 * 0.25, abs=1e-12)  # row 1 ends at the last column
    assert got[2, 0].item() == pytest.approx(0.25 - 0.1 * 0.6, abs=1e-12)  # one-token response
    assert got[3].tolist() == [0.0] * 6  # no response: nowhere to put the score
    # sum over a row's response = score - kl_coef * its KL
    assert got[0].sum().item() == pytest.approx(1.5 - 0.1 * (0.1 + 0.4 - 0.05), abs=1e-12)


def test_token_rewards_ignore_kl_at_masked_positions():
    before = token_rewards(t(SCORE), t(KL), 0.1, t(TMASK))
    after = token_rewards(t(SCORE), t(with_junk(KL, TMASK)), 0.1, torch.tensor(TMASK))
    assert after.tolist() == before.tolist()


@settings(max_examples=40, deadline=None)
@given(ragged(), st.floats(0.0, 1.0))
def test_token_rewards_property(batch, kl_coef):
    mask, kl, scores = batch
    score = [row[0] for row in scores]
    got = token_rewards(t(score), t(kl), kl_coef, t(mask))
    assert_close_rows(got, hand_token_rewards(score, kl, kl_coef, mask), abs_tol=1e-12)


# --- GAE ------------------------------------------------------------------------------------


def hand_gae(rewards, values, mask, gamma, lam):
    """Backwards loop over each row's response span [start, end) with V_end = 0 and A_end = 0."""
    advantages = [[0.0] * len(row) for row in mask]
    returns = [[0.0] * len(row) for row in mask]
    for b, mrow in enumerate(mask):
        response = [i for i, m in enumerate(mrow) if m]
        if not response:
            continue
        start, end = response[0], response[-1] + 1
        next_advantage = 0.0
        for i in range(end - 1, start - 1, -1):
            next_value = values[b][i + 1] if i + 1 < end else 0.0
            delta = rewards[b][i] + gamma * next_value - values[b][i]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[b][i] = next_advantage
            returns[b][i] = next_advantage + values[b][i]
    return advantages, returns


def test_gae_on_a_worked_example():
    # prompt at position 0, response at 1..3, padding at 4; r = 0, 0, 1; V = .5, .2, .4
    mask = [[0, 1, 1, 1, 0]]
    rewards = [[5.0, 0.0, 0.0, 1.0, 3.0]]
    values = [[8.0, 0.5, 0.2, 0.4, -6.0]]
    adv, ret = gae_advantages(t(rewards), t(values), t(mask), gamma=0.9, lam=0.8)
    # A3 = 1 - .4 = .6; A2 = (.9*.4 - .2) + .72*.6 = .592; A1 = (.9*.2 - .5) + .72*.592 = .10624
    assert adv[0].tolist() == pytest.approx([0.0, 0.10624, 0.592, 0.6, 0.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.0, 0.60624, 0.792, 1.0, 0.0], abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(ragged(), UNIT, UNIT)
def test_gae_matches_hand_backwards_loop(batch, gamma, lam):
    mask, rewards, values = batch
    adv, ret = gae_advantages(t(rewards), t(values), t(mask), gamma, lam)
    expected_adv, expected_ret = hand_gae(rewards, values, mask, gamma, lam)
    assert_close_rows(adv, expected_adv)
    assert_close_rows(ret, expected_ret)
    for b, mrow in enumerate(mask):
        for i, m in enumerate(mrow):
            if not m:
                assert adv[b, i].item() == 0.0 and ret[b, i].item() == 0.0


@settings(max_examples=40, deadline=None)
@given(ragged())
def test_gae_with_lambda_one_gamma_one_is_reward_to_go_minus_values(batch):
    mask, rewards, values = batch
    adv, ret = gae_advantages(t(rewards), t(values), t(mask), gamma=1.0, lam=1.0)
    for b, mrow in enumerate(mask):
        for i, m in enumerate(mrow):
            if m:
                to_go = sum(rewards[b][k] for k in range(i, len(mrow)) if mrow[k])
                assert ret[b, i].item() == pytest.approx(to_go, abs=1e-9)
                assert adv[b, i].item() == pytest.approx(to_go - values[b][i], abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(ragged(), UNIT)
def test_gae_with_lambda_zero_is_one_step_td_error(batch, gamma):
    mask, rewards, values = batch
    adv, _ = gae_advantages(t(rewards), t(values), t(mask), gamma=gamma, lam=0.0)
    for b, mrow in enumerate(mask):
        for i, m in enumerate(mrow):
            if m:
                next_value = values[b][i + 1] if i + 1 < len(mrow) and mrow[i + 1] else 0.0
                td = rewards[b][i] + gamma * next_value - values[b][i]
                assert adv[b, i].item() == pytest.approx(td, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(ragged(), UNIT, UNIT, FINITE)
def test_gae_never_reads_masked_positions(batch, gamma, lam, junk):
    mask, rewards, values = batch
    adv, ret = gae_advantages(t(rewards), t(values), t(mask), gamma, lam)
    bad_values = [[v if m else junk * 1e3 for v, m in zip(row, mrow)] for row, mrow in zip(values, mask)]
    bad_rewards = [[r if m else -junk for r, m in zip(row, mrow)] for row, mrow in zip(rewards, mask)]
    adv2, ret2 = gae_advantages(t(bad_rewards), t(bad_values), t(mask), gamma, lam)
    assert adv2.tolist() == adv.tolist() and ret2.tolist() == ret.tolist()
    adv3, ret3 = gae_advantages(t(with_junk(rewards, mask)), t(with_junk(values, mask)), t(mask), gamma, lam)
    assert adv3.tolist() == adv.tolist() and ret3.tolist() == ret.tolist()


def test_sequence_advantage_to_tokens_broadcasts_onto_response_only():
    got = sequence_advantage_to_tokens(t([1.5, -2.0, 0.25, 9.0]), t(TMASK))
    expected = [[a if m else 0.0 for m in mrow] for a, mrow in zip([1.5, -2.0, 0.25, 9.0], TMASK)]
    assert got.tolist() == expected


# --- value head -----------------------------------------------------------------------------


def test_value_head_starts_at_zero_with_right_shapes_and_float32():
    head = ValueHead.from_model_config(SimpleNamespace(hidden_size=8))
    assert head.hidden_size == 8
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        hidden = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
        values = head(hidden)
        assert values.shape == (3, 5)
        assert values.dtype == torch.float32
        assert torch.count_nonzero(values).item() == 0
    with pytest.raises(ValueError):
        head(torch.zeros(1, 2, 7))


def test_value_head_learns_from_zero_init():
    head = ValueHead(4)
    hidden = torch.tensor([[[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 3.0, 1.0]]])
    (head(hidden) - torch.tensor([[1.0, 2.0]])).pow(2).sum().backward()
    assert torch.count_nonzero(head.linear.weight.grad).item() > 0
    assert head.linear.bias.grad.item() != 0.0


def test_value_head_state_dict_round_trips_through_safetensors(tmp_path):
    head = ValueHead(6)
    with torch.no_grad():
        head.linear.weight.copy_(torch.arange(6, dtype=torch.float32).unsqueeze(0) / 10)
        head.linear.bias.fill_(0.5)
    path = tmp_path / "value_head.safetensors"
    save_file(head.state_dict(), str(path))
    loaded = load_file(str(path))
    assert set(loaded) == {"linear.weight", "linear.bias"}
    fresh = ValueHead(6)
    fresh.load_state_dict(loaded)
    hidden = torch.ones(2, 3, 6)
    assert torch.equal(fresh(hidden), head(hidden))
    assert fresh(hidden)[0, 0].item() == pytest.approx(0.5 + 1.5, abs=1e-6)
