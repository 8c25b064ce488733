"""The masked reductions (services/trainer/masking.py) that the loss, advantages and KL share."""

from __future__ import annotations

import pytest
import torch

from services.trainer.masking import masked_mean, masked_sum, where_mask


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_masked_mean_ignores_masked_entries():
    values = t([[1.0, 2.0, 100.0], [4.0, -1000.0, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 4 + 6) / 4, abs=1e-12)
    per_row = masked_mean(values, mask, dim=-1)
    assert per_row.tolist() == pytest.approx([1.5, 5.0], abs=1e-12)


def test_masked_mean_of_an_all_masked_row_is_zero_not_nan():
    values = t([[3.0, 4.0], [5.0, 6.0]])
    mask = t([[0, 0], [1, 0]])
    per_row = masked_mean(values, mask, dim=-1)
    assert per_row.tolist() == [0.0, 5.0]


@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_inf_or_nan_at_masked_positions_reaches_neither_value_nor_gradient(poison):
    values = t([[1.0, poison], [poison, 3.0]]).requires_grad_(True)
    mask = t([[1, 0], [0, 1]])
    loss = masked_mean(values, mask) + masked_sum(values, mask, dim=-1).sum()
    loss.backward()
    assert loss.item() == pytest.approx(2.0 + 4.0)
    assert values.grad.tolist() == [[1.5, 0.0], [0.0, 1.5]]


def test_selecting_equals_multiplying_by_a_0_1_mask_on_finite_values():
    """What ppo.py computed before it shared these helpers (values * mask), to the last bit."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=generator)
    mask = (torch.rand(4, 7, generator=generator) > 0.4).float()
    assert torch.equal(where_mask(values, mask), values * mask)
    assert torch.equal(masked_mean(values, mask), (values * mask).sum() / mask.sum().clamp(min=1))
    assert torch.equal(masked_mean(values, mask, dim=-1), (values * mask).sum(-1) / mask.sum(-1).clamp(min=1))


def test_bool_int_and_float_masks_agree():
    values = t([[1.0, 2.0, 3.0]])
    expected = masked_mean(values, t([[1, 0, 1]]))
    assert masked_mean(values, torch.tensor([[True, False, True]])) == expected
    assert masked_mean(values, torch.tensor([[1, 0, 1]])) == expected
