"""PPO math (services/trainer/ppo.py) checked against the formulas written out by hand.

Every expected value here is computed with plain Python loops over the definition, never by
calling the function under test a second time.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.trainer.advantages import batch_mean_advantage
from services.trainer.kl import kl_k1 as per_token_kl
from services.trainer.ppo import clipped_policy_loss, clipped_value_loss, kl_penalised_reward, sequence_kl
from tests.token_batches import ragged, with_junk

# Two rollouts over 6 positions: row 0 has a 2-position prompt then 3 response tokens then padding;
# row 1 has a 1-position prompt then 5 response tokens.
MASK = [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
LOGPROBS = [[-0.5, -1.0, -0.2, -2.0, -0.7, -3.0], [-1.5, -0.1, -0.9, -0.3, -1.2, -0.05]]
REF_LOGPROBS = [[-0.4, -3.0, -0.6, -1.0, -0.9, -0.1], [-0.2, -0.5, -0.4, -0.8, -1.0, -0.30]]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def hand_token_kl(logprobs, ref, mask):
    return [
        [(lp - rp) if m else 0.0 for lp, rp, m in zip(lrow, rrow, mrow)]
        for lrow, rrow, mrow in zip(logprobs, ref, mask)
    ]


def hand_sequence_kl(logprobs, ref, mask):
    totals = []
    for lrow, rrow, mrow in zip(logprobs, ref, mask):
        total = 0.0
        for lp, rp, m in zip(lrow, rrow, mrow):
            if m:
                total += lp - rp
        totals.append(total)
    return totals


# --- KL -------------------------------------------------------------------------------------


def test_per_token_kl_is_logprob_difference_on_response_tokens_and_zero_elsewhere():
    got = per_token_kl(t(LOGPROBS), t(REF_LOGPROBS), t(MASK))
    expected = hand_token_kl(LOGPROBS, REF_LOGPROBS, MASK)
    assert got.shape == (2, 6)
    for b in range(2):
        for i in range(6):
            assert got[b, i].item() == pytest.approx(expected[b][i], abs=1e-12)
            if not MASK[b][i]:
                assert got[b, i].item() == 0.0


def test_sequence_kl_equals_hand_sum_over_response_tokens():
    token_kl = per_token_kl(t(LOGPROBS), t(REF_LOGPROBS), t(MASK))
    got = sequence_kl(token_kl, t(MASK))
    expected = hand_sequence_kl(LOGPROBS, REF_LOGPROBS, MASK)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    # row 0: (-0.2+0.6) + (-2.0+1.0) + (-0.7+0.9) = 0.4 - 1.0 + 0.2
    assert got[0].item() == pytest.approx(-0.4, abs=1e-12)


def test_sequence_kl_ignores_logprobs_at_prompt_and_padding_positions():
    before = sequence_kl(per_token_kl(t(LOGPROBS), t(REF_LOGPROBS), t(MASK)), t(MASK))
    changed_lp = [row[:] for row in LOGPROBS]
    changed_ref = [row[:] for row in REF_LOGPROBS]
    for b in range(2):
        for i in range(6):
            if not MASK[b][i]:
                changed_lp[b][i] = -50.0 - 7 * i
                changed_ref[b][i] = 11.0 + b
    after = sequence_kl(per_token_kl(t(changed_lp), t(changed_ref), t(MASK)), t(MASK))
    assert after.tolist() == before.tolist()


def test_sequence_kl_changes_when_a_response_logprob_changes():
    before = sequence_kl(per_token_kl(t(LOGPROBS), t(REF_LOGPROBS), t(MASK)), t(MASK))
    changed = [row[:] for row in LOGPROBS]
    changed[1][3] += 0.25
    after = sequence_kl(per_token_kl(t(changed), t(REF_LOGPROBS), t(MASK)), t(MASK))
    assert after[0].item() == before[0].item()
    assert after[1].item() == pytest.approx(before[1].item() + 0.25, abs=1e-12)


def test_kl_penalised_reward_subtracts_beta_times_kl():
    reward = t([1.0, -0.5, 2.0])
    kl = t([0.4, -0.2, 10.0])
    got = kl_penalised_reward(reward, kl, kl_coef=0.05)
    assert got.tolist() == pytest.approx([1.0 - 0.02, -0.5 + 0.01, 2.0 - 0.5], abs=1e-12)
    assert kl_penalised_reward(reward, kl, kl_coef=0.0).tolist() == [1.0, -0.5, 2.0]


def test_batch_mean_advantage_is_reward_minus_batch_mean_and_sums_to_zero():
    rewards = [3.0, -1.0, 0.5, 2.5, 7.0]
    mean = sum(rewards) / len(rewards)
    got = batch_mean_advantage(t(rewards))
    assert got.tolist() == pytest.approx([r - mean for r in rewards], abs=1e-12)
    assert got.sum().item() == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=16))
def test_batch_mean_advantage_always_sums_to_zero(rewards):
    got = batch_mean_advantage(t(rewards))
    mean = sum(rewards) / len(rewards)
    assert got.sum().item() == pytest.approx(0.0, abs=1e-9 * max(1.0, max(abs(r) for r in rewards)) * len(rewards))
    for value, reward in zip(got.tolist(), rewards):
        assert value == pytest.approx(reward - mean, abs=1e-9)


# --- clipped surrogate ----------------------------------------------------------------------


def hand_clipped_loss(new, old, advantages, mask, eps):
    """mean over response tokens of max(-A r, -A clip(r, 1-eps, 1+eps)), plus clip fraction and k3."""
    total, n, clipped_count, k3 = 0.0, 0, 0, 0.0
    for b in range(len(new)):
        a = advantages[b]
        for i in range(len(new[b])):
            if not mask[b][i]:
                continue
            r = math.exp(new[b][i] - old[b][i])
            c = min(max(r, 1.0 - eps), 1.0 + eps)
            unclipped, clipped = -a * r, -a * c
            total += max(unclipped, clipped)
            clipped_count += clipped > unclipped
            k3 += (r - 1.0) - math.log(r)
            n += 1
    return total / n, clipped_count / n, k3 / n


EPS = 0.2
# log ratios chosen to sit clearly inside or clearly outside [log 0.8, log 1.2]
OLD = [[-1.0, -1.0, -1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0, -2.0, -2.0]]
# row 0 (A>0) response ratios: e^.5 (clipped), e^-.05 (inside), e^-.6 (below range: A>0 lets it flow)
# row 1 (A<0) response ratios: e^-.9 (clipped), e^.05 (inside), e^1 (above range: A<0 lets it flow),
#                              e^-.1 (inside), e^-.6 (clipped)
NEW = [[-0.3, -1.5, -0.5, -1.05, -1.6, -0.7], [-2.4, -2.9, -1.95, -1.0, -2.1, -2.6]]
ADV = [1.5, -0.8]


def test_clipped_policy_loss_matches_hand_loop():
    loss, stats = clipped_policy_loss(t(NEW), t(OLD), t(ADV), t(MASK), EPS)
    expected_loss, expected_clip, expected_kl = hand_clipped_loss(NEW, OLD, ADV, MASK, EPS)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(expected_clip, abs=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-12)
    # this batch binds the clip on exactly 3 of the 8 response tokens:
    # row 0 token 2 (A>0, r=e^.5>1.2), row 1 tokens 1 and 4 (A<0, r=e^-.9<0.8, r=e^-.6<0.8)
    assert stats["clip_fraction"].item() == pytest.approx(3 / 8, abs=1e-12)


def test_clipped_policy_loss_ignores_masked_positions():
    loss, stats = clipped_policy_loss(t(NEW), t(OLD), t(ADV), t(MASK), EPS)
    new = [row[:] for row in NEW]
    for b in range(2):
        for i in range(6):
            if not MASK[b][i]:
                new[b][i] = 25.0
    loss2, stats2 = clipped_policy_loss(t(new), t(OLD), t(ADV), t(MASK), EPS)
    assert loss2.item() == loss.item()
    assert stats2["clip_fraction"].item() == stats["clip_fraction"].item()
    assert stats2["approx_kl"].item() == stats["approx_kl"].item()


def loss_gradient(new, old, advantages, mask, eps):
    new_t = t(new).requires_grad_(True)
    loss, _ = clipped_policy_loss(new_t, t(old), t(advantages), t(mask), eps)
    loss.backward()
    return new_t.grad


def test_gradient_is_zero_where_clip_binds_and_minus_a_r_over_n_elsewhere():
    grad = loss_gradient(NEW, OLD, ADV, MASK, EPS)
    n = sum(sum(row) for row in MASK)
    for b in range(2):
        a = ADV[b]
        for i in range(6):
            g = grad[b, i].item()
            if not MASK[b][i]:
                assert g == 0.0, (b, i)
                continue
            r = math.exp(NEW[b][i] - OLD[b][i])
            binds = (a > 0 and r > 1 + EPS) or (a < 0 and r < 1 - EPS)
            if binds:
                assert g == 0.0, (b, i, r)
            else:
                assert g != 0.0, (b, i, r)
                assert g == pytest.approx(-a * r / n, rel=1e-10), (b, i, r)


def test_gradient_flows_when_ratio_is_outside_the_clip_range_in_the_allowed_direction():
    # A>0 with r<1-eps and A<0 with r>1+eps: the unclipped (more pessimistic) term wins, so gradient flows.
    old = [[0.0, 0.0], [0.0, 0.0]]
    new = [[math.log(0.5), math.log(1.5)], [math.log(1.6), math.log(0.4)]]
    adv = [2.0, -3.0]
    mask = [[1, 1], [1, 1]]
    grad = loss_gradient(new, old, adv, mask, EPS)
    # row 0: r=0.5 flows (A>0, below range), r=1.5 clipped; row 1: r=1.6 flows (A<0, above range), r=0.4 clipped
    assert grad[0, 0].item() == pytest.approx(-2.0 * 0.5 / 4, rel=1e-10)
    assert grad[0, 1].item() == 0.0
    assert grad[1, 0].item() == pytest.approx(3.0 * 1.6 / 4, rel=1e-10)
    assert grad[1, 1].item() == 0.0
    _, stats = clipped_policy_loss(t(new), t(old), t(adv), t(mask), EPS)
    assert stats["clip_fraction"].item() == pytest.approx(0.5, abs=1e-12)


def test_loss_at_ratio_one_is_minus_mean_token_advantage_and_nothing_is_clipped():
    new = [[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]]
    mask = [[1, 1, 0], [1, 1, 1]]
    adv = [2.0, -1.0]
    loss, stats = clipped_policy_loss(t(new), t(new), t(adv), t(mask), EPS)
    assert loss.item() == pytest.approx((-2.0 * 2 + 1.0 * 3) / 5, abs=1e-12)
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-15)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5), st.booleans()), min_size=1, max_size=24),
    st.floats(-3, 3),
    st.floats(0.01, 0.9),
)
def test_approx_kl_is_never_negative(tokens, advantage, eps):
    new = [[x for x, _, _ in tokens]]
    old = [[y for _, y, _ in tokens]]
    mask = [[1.0 if m else 0.0 for _, _, m in tokens]]
    mask[0][0] = 1.0  # at least one response token
    loss, stats = clipped_policy_loss(t(new), t(old), t([advantage]), t(mask), eps)
    assert stats["approx_kl"].item() >= 0.0
    expected_loss, expected_clip, expected_kl = hand_clipped_loss(new, old, [advantage], mask, eps)
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-9, abs=1e-12)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9, abs=1e-12)
    assert 0.0 <= stats["clip_fraction"].item() <= 1.0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-8, 0, width=32), st.floats(-(2.0**-10), 2.0**-10, width=32)), min_size=1, max_size=32)
)
def test_approx_kl_is_never_negative_in_float32_near_ratio_one(tokens):
    # The trainer works in float32 and, on its first epoch, new and old log-probs differ only by
    # rounding noise: the k3 estimate must still never report a negative KL.
    old = torch.tensor([[o for o, _ in tokens]], dtype=torch.float32)
    new = old + torch.tensor([[d for _, d in tokens]], dtype=torch.float32)
    mask = torch.ones_like(old)
    _, stats = clipped_policy_loss(new, old, torch.tensor([1.0]), mask, 0.2)
    assert stats["approx_kl"].item() >= 0.0


def test_stats_carry_no_gradient():
    new_t = t(NEW).requires_grad_(True)
    _, stats = clipped_policy_loss(new_t, t(OLD), t(ADV), t(MASK), EPS)
    assert not stats["clip_fraction"].requires_grad
    assert not stats["approx_kl"].requires_grad


# --- clipped value loss ---------------------------------------------------------------------

CLIP = 0.2
# Response cases (old = 0 throughout), chosen away from ties and clip boundaries:
#   V = .5,  R = 1   above range, clipped term (.8^2) is the max      -> clip binds, gradient 0
#   V = .5,  R = 0   above range, unclipped (.25) > clipped (.04)     -> gradient (V - R) / N
#   V = .1,  R = 1   inside range, both terms equal                   -> gradient (V - R) / N
#   V = -.5, R = -1  below range, clipped term (.8^2) is the max      -> clip binds, gradient 0
#   V = -.5, R = 0   below range, unclipped is the max                -> gradient (V - R) / N
#   V = .3,  R = .6, old = .25: inside range                          -> gradient (V - R) / N
VMASK = [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
VALUES = [[3.0, 0.5, 0.5, 0.1, -9.0], [1.0, 2.0, -0.5, -0.5, 0.3]]
OLD_VALUES = [[0.0, 0.0, 0.0, 0.0, 4.0], [0.0, -5.0, 0.0, 0.0, 0.25]]
RETURNS = [[0.0, 1.0, 0.0, 1.0, 2.0], [7.0, 0.0, -1.0, 0.0, 0.6]]
BINDS = {(0, 1), (1, 2)}


def hand_value_loss(values, old, returns, mask, clip):
    total, n, clipped_count = 0.0, 0, 0
    for b in range(len(values)):
        for i in range(len(values[b])):
            if not mask[b][i]:
                continue
            v, o, r = values[b][i], old[b][i], returns[b][i]
            vc = min(max(v, o - clip), o + clip)
            unclipped, clipped = (v - r) ** 2, (vc - r) ** 2
            total += max(unclipped, clipped)
            clipped_count += clipped > unclipped
            n += 1
    return 0.5 * total / n, clipped_count / n


def test_clipped_value_loss_matches_hand_loop():
    loss, clip_fraction = clipped_value_loss(t(VALUES), t(OLD_VALUES), t(RETURNS), t(VMASK), CLIP)
    expected_loss, expected_fraction = hand_value_loss(VALUES, OLD_VALUES, RETURNS, VMASK, CLIP)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert clip_fraction.item() == pytest.approx(expected_fraction, abs=1e-12)
    assert clip_fraction.item() == pytest.approx(2 / 6, abs=1e-12)
    # 0.5 * mean(.64, .25, .81, .64, .25, .09)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25 + 0.81 + 0.64 + 0.25 + 0.09) / 6, abs=1e-12)


def test_clipped_value_loss_gradient_is_zero_where_clip_binds_and_on_masked_positions():
    values = t(VALUES).requires_grad_(True)
    loss, _ = clipped_value_loss(values, t(OLD_VALUES), t(RETURNS), t(VMASK), CLIP)
    loss.backward()
    n = sum(sum(row) for row in VMASK)
    for b in range(2):
        for i in range(5):
            g = values.grad[b, i].item()
            if not VMASK[b][i] or (b, i) in BINDS:
                assert g == 0.0, (b, i)
            else:
                assert g == pytest.approx((VALUES[b][i] - RETURNS[b][i]) / n, rel=1e-10), (b, i)


def test_clipped_value_loss_ignores_masked_positions():
    before = clipped_value_loss(t(VALUES), t(OLD_VALUES), t(RETURNS), t(VMASK), CLIP)
    after = clipped_value_loss(
        t(with_junk(VALUES, VMASK)), t(with_junk(OLD_VALUES, VMASK)), t(with_junk(RETURNS, VMASK)), t(VMASK), CLIP
    )
    assert after[0].item() == before[0].item() and after[1].item() == before[1].item()


@settings(max_examples=40, deadline=None)
@given(ragged(min_len=1), st.floats(0.01, 1.0))
def test_clipped_value_loss_property(batch, clip):
    mask, values, returns = batch
    old = [[0.9 * v + 0.1 * r for v, r in zip(vrow, rrow)] for vrow, rrow in zip(values, returns)]
    loss, fraction = clipped_value_loss(t(values), t(old), t(returns), t(mask), clip)
    expected_loss, expected_fraction = hand_value_loss(values, old, returns, mask, clip)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-9, rel=1e-9)
    assert fraction.item() == pytest.approx(expected_fraction, abs=1e-12)
