"""Masked selection and reductions over token positions: the one set the PPO loss (ppo.py), the
advantages (advantages.py) and the KL estimators (kl.py) all use.

Shapes: B rollouts, T token positions; a mask has the shape of the values or broadcasts to it, is
1 on the positions that count (response tokens) and 0 on the rest (prompt, padding), and may be
bool, int or float. Values at masked positions never reach a result: they are selected away with
torch.where, so even inf or nan there cannot leak in through 0 * inf (as values * mask would let
them), neither into values nor into gradients.
"""

from __future__ import annotations

import torch


def where_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values where mask is set, exact 0 elsewhere (whatever values holds there). Same shape as values."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum of values over the positions mask sets, over dim (all dims when None).

    (B, T), (B, T) -> scalar, or (B,) with dim=-1.
    """
    selected = where_mask(values, mask)
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_m(values) / number of masked positions over dim (all dims when None); 0 where none is set.

    (B, T), (B, T) -> scalar, or (B,) with dim=-1.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1).to(values.dtype)
