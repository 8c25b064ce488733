"""The canary drift number against its definition: 1 - 2M/T, M tokens matched in order, T tokens in
both answers together, averaged over the canary prompts."""

import pytest

from services.policy.canaries import canary_drift, token_drift


def test_identical_answers_have_no_drift_and_disjoint_ones_full_drift():
    assert token_drift([5, 6, 7], [5, 6, 7]) == 0.0
    assert token_drift([5, 6, 7], [8, 9]) == 1.0
    assert token_drift([], []) == 0.0
    assert token_drift([], [1]) == 1.0


def test_partial_overlap_is_one_minus_twice_the_matches_over_all_tokens():
    # [1, 2, 3, 4] vs [1, 2, 9, 4, 8]: 1, 2 and 4 match in order, M = 3, T = 4 + 5 = 9.
    assert token_drift([1, 2, 3, 4], [1, 2, 9, 4, 8]) == pytest.approx(1 - 2 * 3 / 9)
    # order matters: the reversed answer matches only one token in order.
    assert token_drift([1, 2, 3], [3, 2, 1]) == pytest.approx(1 - 2 * 1 / 6)


def test_drift_is_the_mean_over_prompts():
    first = [[1, 2, 3, 4], [7, 7]]
    now = [[1, 2, 3, 4], [8, 8]]
    assert canary_drift(first, now) == pytest.approx((0.0 + 1.0) / 2)


def test_a_different_number_of_answers_is_refused_by_name():
    with pytest.raises(ValueError, match="canary answers"):
        canary_drift([[1]], [[1], [2]])
