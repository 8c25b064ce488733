"""The sampler/trainer mismatch metrics and truncated importance sampling (services/trainer/mismatch.py),
against their formulas written out here token by token."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer.mismatch import logprob_mismatch, truncated_importance_weights

TRAINER = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.1, -3.0, -4.0, -7.0]])
BEHAVIOUR = torch.tensor([[-1.2, -1.5, -0.5, -1.0], [-0.3, -3.5, -6.0, -1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])  # the last column is padding


def response_gaps() -> list[float]:
    return [
        t - b
        for tr, br, mr in zip(TRAINER.tolist(), BEHAVIOUR.tolist(), MASK.tolist())
        for t, b, m in zip(tr, br, mr)
        if m
    ]


def test_mean_abs_and_k3_follow_their_formulas_on_response_tokens_only():
    gaps = response_gaps()
    mean_abs, k3 = logprob_mismatch(TRAINER, BEHAVIOUR, MASK)
    assert mean_abs == pytest.approx(sum(abs(r) for r in gaps) / len(gaps))
    assert k3 == pytest.approx(sum(math.exp(r) - 1 - r for r in gaps) / len(gaps))


def test_the_metrics_are_zero_when_sampler_and_trainer_agree_and_positive_when_not():
    assert logprob_mismatch(BEHAVIOUR, BEHAVIOUR, MASK) == (0.0, 0.0)
    mean_abs, k3 = logprob_mismatch(TRAINER, BEHAVIOUR, MASK)
    assert mean_abs > 0 and k3 > 0


def test_truncated_importance_weights_are_the_capped_ratio_without_grad():
    trainer = TRAINER.clone().requires_grad_(True)
    weights = truncated_importance_weights(trainer, BEHAVIOUR, MASK, cap=2.0)
    expected = [
        [min(math.exp(t - b), 2.0) * m for t, b, m in zip(tr, br, mr)]
        for tr, br, mr in zip(TRAINER.tolist(), BEHAVIOUR.tolist(), MASK.tolist())
    ]
    assert weights.flatten().tolist() == pytest.approx([w for row in expected for w in row])
    assert not weights.requires_grad
    assert weights.max() == 2.0  # the token at -4.0 against -6.0 has ratio e^2 > 2: capped


def test_a_cap_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="tis_cap must be positive"):
        truncated_importance_weights(TRAINER, BEHAVIOUR, MASK, cap=0.0)


def test_the_ppo_loss_weights_each_token_by_its_importance_weight():
    """loss = token mean of w_t * max(-A ratio_t, -A clip(ratio_t)), written out here."""
    from services.trainer.ppo import clipped_policy_loss

    new = torch.tensor([[-1.0, -1.1, -0.2, 0.0]])
    old = torch.tensor([[-1.2, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantage, eps = torch.tensor([0.7]), 0.2
    weights = torch.tensor([[0.5, 2.0, 1.0, 9.0]])
    loss, _ = clipped_policy_loss(new, old, advantage, mask, eps, "token_mean", weights)
    terms = []
    for n, o, w in zip(new[0, :3].tolist(), old[0, :3].tolist(), weights[0, :3].tolist()):
        ratio = math.exp(n - o)
        terms.append(w * max(-0.7 * ratio, -0.7 * min(max(ratio, 1 - eps), 1 + eps)))
    assert loss.item() == pytest.approx(sum(terms) / 3)
    unweighted, _ = clipped_policy_loss(new, old, advantage, mask, eps, "token_mean")
    assert unweighted.item() != pytest.approx(loss.item())
