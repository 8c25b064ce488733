"""Loss aggregation, per-token advantages in the clipped loss, and the learning-rate schedule,
against their formulas written out here."""

import math

import pytest
import torch

from services.trainer.ppo import aggregate_loss, clipped_policy_loss, lr_factor

LOSSES = [[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 0.0, 0.0]]
MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_token_mean_weighs_every_response_token_equally():
    got = aggregate_loss(torch.tensor(LOSSES), torch.tensor(MASK), "token_mean")
    assert got.item() == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_sequence_mean_weighs_every_response_equally():
    got = aggregate_loss(torch.tensor(LOSSES), torch.tensor(MASK), "sequence_mean")
    assert got.item() == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)


def test_unknown_aggregation_is_refused_by_name():
    with pytest.raises(ValueError, match="per_batch"):
        aggregate_loss(torch.tensor(LOSSES), torch.tensor(MASK), "per_batch")


def test_per_token_advantages_enter_the_clipped_loss_token_by_token():
    new = torch.tensor([[0.1, -0.3, 0.0], [0.5, 0.0, 0.0]])
    old = torch.zeros_like(new)
    advantages = torch.tensor([[1.0, -2.0, 5.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = clipped_policy_loss(new, old, advantages, mask, clip_eps=0.2)
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                ratio = math.exp(new[b, t].item())
                a = advantages[b, t].item()
                expected += max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
                count += 1
    assert loss.item() == pytest.approx(expected / count, rel=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warm_up_rises_linearly_to_one(schedule):
    assert [lr_factor(s, 4, 10, schedule) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_decays_follow_their_formulas_after_warm_up():
    for step in range(2, 20):
        s = step - 2
        assert lr_factor(step, 2, 10, "constant") == 1.0
        assert lr_factor(step, 2, 10, "linear") == pytest.approx(max(0.0, 1 - s / 10))
        assert lr_factor(step, 2, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * min(s, 10) / 10)))
    assert lr_factor(100, 0, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="step"):
        lr_factor(0, 0, 10, "step")
