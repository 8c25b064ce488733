"""KL estimators and controllers (services/trainer/kl.py) checked against the formulas written out by hand.

Every expected value here is computed with plain Python loops over the definition, never by
calling the function under test a second time.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.trainer.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    exact_kl_from_rows,
    kl_k1,
    kl_k2,
    kl_k3,
    per_token_kl,
)

# Two rollouts over 6 positions: row 0 has a 2-position prompt then 3 response tokens then padding;
# row 1 has a 1-position prompt then 5 response tokens.
MASK = [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
LOGPROBS = [[-0.5, -1.0, -0.2, -2.0, -0.7, -3.0], [-1.5, -0.1, -0.9, -0.3, -1.2, -0.05]]
REF_LOGPROBS = [[-0.4, -3.0, -0.6, -1.0, -0.9, -0.1], [-0.2, -0.5, -0.4, -0.8, -1.0, -0.30]]


def t(rows, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def hand_k1(lp, rp):
    return lp - rp


def hand_k2(lp, rp):
    return 0.5 * (lp - rp) ** 2


def hand_k3(lp, rp):
    log_r = rp - lp
    return (math.exp(log_r) - 1.0) - log_r


def hand_per_token(formula, logprobs, ref, mask):
    return [
        [formula(lp, rp) if m else 0.0 for lp, rp, m in zip(lrow, rrow, mrow)]
        for lrow, rrow, mrow in zip(logprobs, ref, mask)
    ]


ESTIMATOR_FUNCTIONS = {"k1": (kl_k1, hand_k1), "k2": (kl_k2, hand_k2), "k3": (kl_k3, hand_k3)}


# --- per-token estimators ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_estimator_matches_hand_formula_on_response_tokens_and_is_zero_elsewhere(name):
    function, formula = ESTIMATOR_FUNCTIONS[name]
    expected = hand_per_token(formula, LOGPROBS, REF_LOGPROBS, MASK)
    for got in (
        function(t(LOGPROBS), t(REF_LOGPROBS), t(MASK)),
        per_token_kl(name, t(LOGPROBS), t(REF_LOGPROBS), t(MASK)),
    ):
        assert got.shape == (2, 6)
        for b in range(2):
            for i in range(6):
                assert got[b, i].item() == pytest.approx(expected[b][i], rel=1e-12, abs=1e-15), (name, b, i)
                if not MASK[b][i]:
                    assert got[b, i].item() == 0.0


def test_the_three_estimators_differ_on_the_same_tokens():
    # row 0 token 3: log pi - log pi_ref = -1.0, so k1 = -1, k2 = 0.5, k3 = (e - 1) - 1
    k1 = kl_k1(t(LOGPROBS), t(REF_LOGPROBS), t(MASK))[0, 3].item()
    k2 = kl_k2(t(LOGPROBS), t(REF_LOGPROBS), t(MASK))[0, 3].item()
    k3 = kl_k3(t(LOGPROBS), t(REF_LOGPROBS), t(MASK))[0, 3].item()
    assert k1 == pytest.approx(-1.0, abs=1e-12)
    assert k2 == pytest.approx(0.5, abs=1e-12)
    assert k3 == pytest.approx(math.e - 2.0, abs=1e-12)


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_masked_positions_never_change_the_result_even_when_huge_or_infinite(name):
    function, _ = ESTIMATOR_FUNCTIONS[name]
    before = function(t(LOGPROBS), t(REF_LOGPROBS), t(MASK))
    for huge_lp, huge_ref in ((1e30, -1e30), (-1e4, 1e4), (-math.inf, 0.0), (0.0, math.inf)):
        changed_lp = [row[:] for row in LOGPROBS]
        changed_ref = [row[:] for row in REF_LOGPROBS]
        for b in range(2):
            for i in range(6):
                if not MASK[b][i]:
                    changed_lp[b][i] = huge_lp
                    changed_ref[b][i] = huge_ref
        lp = t(changed_lp).requires_grad_(True)
        after = function(lp, t(changed_ref), t(MASK))
        assert after.tolist() == before.tolist(), (huge_lp, huge_ref)
        after.sum().backward()
        assert torch.isfinite(lp.grad).all(), (huge_lp, huge_ref)
        for b in range(2):
            for i in range(6):
                if not MASK[b][i]:
                    assert lp.grad[b, i].item() == 0.0


def test_bool_mask_gives_the_same_as_float_mask():
    for name in ("k1", "k2", "k3"):
        as_float = per_token_kl(name, t(LOGPROBS), t(REF_LOGPROBS), t(MASK))
        as_bool = per_token_kl(name, t(LOGPROBS), t(REF_LOGPROBS), torch.tensor(MASK, dtype=torch.bool))
        assert as_bool.tolist() == as_float.tolist()


def test_mismatched_shapes_are_refused_rather_than_broadcast():
    with pytest.raises(ValueError, match="same"):
        kl_k1(t(LOGPROBS), t(REF_LOGPROBS)[:, :1], t(MASK))
    with pytest.raises(ValueError, match="same"):
        kl_k3(t(LOGPROBS), t(REF_LOGPROBS), t(MASK)[0])


def test_per_token_kl_rejects_unknown_estimator_naming_it_and_the_known_ones():
    with pytest.raises(ValueError) as info:
        per_token_kl("k4", t(LOGPROBS), t(REF_LOGPROBS), t(MASK))
    message = str(info.value)
    assert "'k4'" in message
    for known in ("k1", "k2", "k3"):
        assert known in message


def test_per_token_kl_points_full_to_exact_kl_from_rows():
    with pytest.raises(ValueError, match="exact_kl_from_rows"):
        per_token_kl("full", t(LOGPROBS), t(REF_LOGPROBS), t(MASK))


def test_kl_estimators_tuple():
    assert KL_ESTIMATORS == ("k1", "k2", "k3", "full")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-40, 0), st.floats(-40, 0), st.booleans()), min_size=1, max_size=24))
def test_k3_is_never_negative_in_float64_and_matches_hand_formula(tokens):
    lp = [[x for x, _, _ in tokens]]
    rp = [[y for _, y, _ in tokens]]
    mask = [[1.0 if m else 0.0 for _, _, m in tokens]]
    got = kl_k3(t(lp), t(rp), t(mask))
    assert (got >= 0).all()
    expected = hand_per_token(hand_k3, lp, rp, mask)[0]
    for value, want in zip(got[0].tolist(), expected):
        assert value == pytest.approx(want, rel=1e-9, abs=1e-15)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-30, 0, width=32), st.floats(-30, 0, width=32)), min_size=1, max_size=32))
def test_k3_is_never_negative_in_float32(tokens):
    lp = t([[x for x, _ in tokens]], torch.float32)
    rp = t([[y for _, y in tokens]], torch.float32)
    got = kl_k3(lp, rp, torch.ones_like(lp))
    assert got.dtype == torch.float32
    assert (got >= 0).all()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-8, 0, width=32), st.floats(-(2.0**-8), 2.0**-8, width=32)), min_size=1, max_size=32)
)
def test_k3_in_float32_near_ratio_one_is_never_negative_and_accurate(tokens):
    # First epoch: policy and reference differ by rounding noise. exp(x) - 1 - x in float32 would be
    # all rounding error here (errors ~1e-7 against true values ~x^2/2); expm1 keeps it accurate.
    ref = t([[o for o, _ in tokens]], torch.float32)
    lp = ref + t([[d for _, d in tokens]], torch.float32)
    got = kl_k3(lp, ref, torch.ones_like(lp))
    assert (got >= 0).all()
    for value, a, b in zip(got[0].tolist(), lp[0].tolist(), ref[0].tolist()):
        # the float32 log-probs, taken exactly, into the float64 formula
        log_r = b - a
        want = math.expm1(log_r) - log_r
        # expm1 in float32 is good to about one ulp of log_r, and the subtraction is then exact;
        # exp(log_r) - 1 would be off by up to an ulp of 1 (2^-24), far more than this allows.
        assert value == pytest.approx(want, rel=1e-4, abs=2 * 2.0**-23 * abs(log_r))


# --- unbiasedness: sample tokens from pi ------------------------------------------------------

PI = [0.45, 0.25, 0.15, 0.1, 0.05]
PI_REF = [0.1, 0.3, 0.1, 0.3, 0.2]
N_SAMPLES = 200_000


def exact_kl(p, q):
    return sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))


def sampled_estimates(name):
    """Per-token estimates for N_SAMPLES tokens a ~ PI, laid out as (B, T) = (400, 500)."""
    generator = torch.Generator().manual_seed(1234)
    # torch.distributions.Categorical.sample takes no generator; this is the same draw, seeded.
    samples = torch.multinomial(
        torch.tensor(PI, dtype=torch.float64), N_SAMPLES, replacement=True, generator=generator
    ).view(400, 500)
    log_pi = torch.log(torch.tensor(PI, dtype=torch.float64))
    log_ref = torch.log(torch.tensor(PI_REF, dtype=torch.float64))
    mask = torch.ones(400, 500, dtype=torch.float64)
    return per_token_kl(name, log_pi[samples], log_ref[samples], mask).reshape(-1)


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_sampled_estimator_is_unbiased_for_the_exact_kl(name):
    kl = exact_kl(PI, PI_REF)
    estimates = sampled_estimates(name)
    mean = estimates.mean().item()
    standard_error = estimates.std().item() / math.sqrt(N_SAMPLES)
    assert standard_error < 0.02 * kl  # the check below is tight relative to the KL itself
    assert abs(mean - kl) < 4 * standard_error, (name, mean, kl, standard_error)


def test_k2_sampled_mean_is_measurably_biased_so_the_sampling_check_can_fail():
    kl = exact_kl(PI, PI_REF)
    estimates = sampled_estimates("k2")
    standard_error = estimates.std().item() / math.sqrt(N_SAMPLES)
    assert abs(estimates.mean().item() - kl) > 10 * standard_error


def test_k1_has_negative_tokens_and_k3_never_does():
    assert (sampled_estimates("k1") < 0).any()
    assert (sampled_estimates("k3") >= 0).all()


# --- exact KL over rows -----------------------------------------------------------------------


def log_softmax_list(logits):
    top = max(logits)
    log_z = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - log_z for x in logits]


def hand_exact_kl(policy_rows, ref_rows, mask, renormalise):
    out = []
    for b in range(len(policy_rows)):
        row = []
        for i in range(len(policy_rows[b])):
            if not mask[b][i]:
                row.append(0.0)
                continue
            p, q = policy_rows[b][i], ref_rows[b][i]
            if renormalise:
                p, q = log_softmax_list(p), log_softmax_list(q)
            row.append(sum(math.exp(pk) * (pk - qk) for pk, qk in zip(p, q)))
        out.append(row)
    return out


def random_rows(generator, shape, scale=1.0):
    return torch.log_softmax(scale * torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


ROW_MASK = [[0, 1, 1, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("renormalise", [False, True])
def test_exact_kl_from_rows_matches_hand_loop(renormalise):
    generator = torch.Generator().manual_seed(7)
    policy = random_rows(generator, (2, 4, 6))
    ref = random_rows(generator, (2, 4, 6))
    if renormalise:  # rows that do not sum to one: a truncated support
        policy, ref = policy[..., :4], ref[..., :4]
    got = exact_kl_from_rows(policy, ref, t(ROW_MASK), renormalise=renormalise)
    expected = hand_exact_kl(policy.tolist(), ref.tolist(), ROW_MASK, renormalise)
    assert got.shape == (2, 4)
    for b in range(2):
        for i in range(4):
            assert got[b, i].item() == pytest.approx(expected[b][i], rel=1e-12, abs=1e-15)
            if ROW_MASK[b][i]:
                assert got[b, i].item() > 0.0  # the rows differ, so the KL is strictly positive
            else:
                assert got[b, i].item() == 0.0


def test_exact_kl_from_rows_is_zero_for_identical_rows():
    generator = torch.Generator().manual_seed(8)
    rows = random_rows(generator, (3, 5, 7))
    mask = torch.ones(3, 5, dtype=torch.float64)
    for renormalise in (False, True):
        got = exact_kl_from_rows(rows, rows.clone(), mask, renormalise=renormalise)
        assert torch.allclose(got, torch.zeros(3, 5, dtype=torch.float64), atol=1e-15)


def test_renormalise_changes_nothing_on_full_vocabulary_rows_but_does_on_truncated_rows():
    generator = torch.Generator().manual_seed(9)
    policy = random_rows(generator, (2, 4, 50))
    ref = random_rows(generator, (2, 4, 50))
    mask = t(ROW_MASK)
    plain = exact_kl_from_rows(policy, ref, mask, renormalise=False)
    renormed = exact_kl_from_rows(policy, ref, mask, renormalise=True)
    assert torch.allclose(plain, renormed, rtol=1e-12, atol=1e-14)
    plain_cut = exact_kl_from_rows(policy[..., :10], ref[..., :10], mask, renormalise=False)
    renormed_cut = exact_kl_from_rows(policy[..., :10], ref[..., :10], mask, renormalise=True)
    assert (plain_cut - renormed_cut).abs().max().item() > 1e-3


def test_exact_kl_from_rows_ignores_masked_rows_even_with_infinities():
    generator = torch.Generator().manual_seed(10)
    policy = random_rows(generator, (2, 4, 6))
    ref = random_rows(generator, (2, 4, 6))
    mask = t(ROW_MASK)
    before = exact_kl_from_rows(policy, ref, mask, renormalise=False)
    policy2, ref2 = policy.clone(), ref.clone()
    for b in range(2):
        for i in range(4):
            if not ROW_MASK[b][i]:
                policy2[b, i] = torch.tensor([1e30, -math.inf, 5.0, -1e30, 0.0, 3.0])
                ref2[b, i] = -math.inf
    policy2.requires_grad_(True)
    for renormalise in (False, True):
        after = exact_kl_from_rows(policy2, ref2, mask, renormalise=renormalise)
        assert after.tolist() == exact_kl_from_rows(policy, ref, mask, renormalise=renormalise).tolist()
    after = exact_kl_from_rows(policy2, ref2, mask, renormalise=False)
    assert after.tolist() == before.tolist()
    after.sum().backward()
    assert torch.isfinite(policy2.grad).all()


def test_zero_probability_tokens_count_zero_not_nan():
    # pi puts no mass on token 2; pi_ref puts none on token 2 either: 0 * log(0/0) counts 0.
    policy = torch.log(t([[[0.5, 0.5, 0.0]]]))
    ref = torch.log(t([[[0.25, 0.75, 0.0]]]))
    got = exact_kl_from_rows(policy, ref, t([[1]]), renormalise=False)
    assert got.item() == pytest.approx(0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75), abs=1e-12)


def test_exact_kl_from_rows_refuses_mismatched_shapes():
    rows = torch.zeros(2, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError):
        exact_kl_from_rows(rows, rows[..., :2], t(ROW_MASK), renormalise=False)
    with pytest.raises(ValueError):
        exact_kl_from_rows(rows, rows, t(ROW_MASK)[:, :3], renormalise=False)


def top_k_case(peak, noise, seed, vocab=1000, k=10):
    """Full-vocabulary rows (1, 1, vocab) and the same rows cut to the reference's top-k ids."""
    generator = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(vocab, generator=generator, dtype=torch.float64)
    ref_logits[:k] += peak
    policy_logits = ref_logits + noise * torch.randn(vocab, generator=generator, dtype=torch.float64)
    policy = torch.log_softmax(policy_logits, -1)
    ref = torch.log_softmax(ref_logits, -1)
    top = ref.topk(k).indices
    mass_in_top_k = policy[top].exp().sum().item()
    return (
        policy.view(1, 1, vocab),
        ref.view(1, 1, vocab),
        policy[top].view(1, 1, k),
        ref[top].view(1, 1, k),
        mass_in_top_k,
    )


def test_top_k_kl_is_close_to_the_full_kl_when_pi_is_peaked():
    full_policy, full_ref, top_policy, top_ref, mass = top_k_case(peak=12.0, noise=0.3, seed=0)
    mask = t([[1]])
    assert mass > 0.99
    full = exact_kl_from_rows(full_policy, full_ref, mask, renormalise=False).item()
    truncated = exact_kl_from_rows(top_policy, top_ref, mask, renormalise=True).item()
    assert full > 0.01
    assert truncated == pytest.approx(full, rel=0.01)


def test_top_k_kl_is_measurably_off_when_pi_is_flat():
    # This is the cost of truncation: the mass outside the top-k is ignored.
    full_policy, full_ref, top_policy, top_ref, mass = top_k_case(peak=0.0, noise=0.5, seed=0)
    mask = t([[1]])
    assert mass < 0.1  # 10 of 1000 ids hold under a tenth of pi
    full = exact_kl_from_rows(full_policy, full_ref, mask, renormalise=False).item()
    truncated = exact_kl_from_rows(top_policy, top_ref, mask, renormalise=True).item()
    unnormalised = exact_kl_from_rows(top_policy, top_ref, mask, renormalise=False).item()
    assert full > 0.05
    assert abs(truncated - full) > 0.3 * full
    assert abs(unnormalised - full) > 0.3 * full


# --- controllers ------------------------------------------------------------------------------


def hand_ziegler(beta, target, horizon, updates):
    values = []
    for current_kl, n_steps in updates:
        error = current_kl / target - 1.0
        error = min(error, 0.2)
        error = max(error, -0.2)
        beta = beta * (1.0 + error * n_steps / horizon)
        values.append(beta)
    return values


# (kl, n_steps): far above target (clipped at +0.2), slightly above, far below (clipped at -0.2),
# slightly below, on target, zero KL (clipped at -0.2), huge KL (clipped)
UPDATES = [(60.0, 256), (6.6, 256), (0.5, 512), (5.5, 128), (6.0, 256), (0.0, 256), (1e6, 64), (7.0, 1000)]


def test_adaptive_controller_matches_hand_loop_of_ziegler_formula():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    expected = hand_ziegler(0.2, 6.0, 10_000, UPDATES)
    for (current_kl, n_steps), want in zip(UPDATES, expected):
        returned = controller.update(current_kl, n_steps)
        assert returned == pytest.approx(want, rel=1e-14)
        assert controller.value == returned


def test_adaptive_controller_clips_the_proportional_error_at_plus_and_minus_0_2():
    up = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=100)
    assert up.update(50.0, 10) == pytest.approx(1.0 + 0.2 * 10 / 100, rel=1e-14)  # error 49 -> 0.2
    down = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=100)
    assert down.update(0.0, 10) == pytest.approx(1.0 - 0.2 * 10 / 100, rel=1e-14)  # error -1 -> -0.2
    inside = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=100)
    assert inside.update(1.1, 10) == pytest.approx(1.0 + 0.1 * 10 / 100, rel=1e-12)  # not clipped


def test_adaptive_controller_raises_beta_above_target_lowers_below_and_holds_on_target():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=2.0, horizon=1000)
    assert controller.update(3.0, 100) > 0.1
    before = controller.value
    assert controller.update(1.0, 100) < before
    before = controller.value
    assert controller.update(2.0, 100) == before


def test_adaptive_controller_state_dict_round_trip_continues_identically():
    original = AdaptiveKLController(init_kl_coef=0.3, target=4.0, horizon=5000)
    for current_kl, n_steps in UPDATES[:4]:
        original.update(current_kl, n_steps)
    state = json.loads(json.dumps(original.state_dict()))
    assert set(state) == {"value", "target", "horizon"}
    restored = AdaptiveKLController(init_kl_coef=9.0, target=1.0, horizon=1)
    restored.load_state_dict(state)
    assert restored.value == original.value
    for current_kl, n_steps in UPDATES[4:]:
        assert restored.update(current_kl, n_steps) == original.update(current_kl, n_steps)
    assert restored.state_dict() == original.state_dict()


@pytest.mark.parametrize(
    "target, horizon, field", [(0.0, 100, "target"), (-1.0, 100, "target"), (6.0, 0, "horizon"), (6.0, -5, "horizon")]
)
def test_adaptive_controller_validates_target_and_horizon(target, horizon, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveKLController(init_kl_coef=0.1, target=target, horizon=horizon)
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    with pytest.raises(ValueError, match=field):
        controller.load_state_dict({"value": 0.1, "target": target, "horizon": horizon})


def test_fixed_controller_never_changes_and_round_trips():
    controller = FixedKLController(0.05)
    assert controller.value == 0.05
    for current_kl, n_steps in UPDATES:
        assert controller.update(current_kl, n_steps) == 0.05
    assert controller.value == 0.05
    state = json.loads(json.dumps(controller.state_dict()))
    other = FixedKLController(1.0)
    other.load_state_dict(state)
    assert other.value == 0.05
    assert other.update(100.0, 10) == 0.05
