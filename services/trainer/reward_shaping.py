"""Reward shaping before the KL penalty and the advantage. Pure functions over tensors: no I/O, no config.

Shapes: B rollouts; rewards are one scalar per response, (B,).
RunningMoments keeps its state as plain Python numbers so it saves to JSON in a checkpoint.
"""

from __future__ import annotations

import math

import torch


def clip_reward(rewards: torch.Tensor, limit: float) -> torch.Tensor:
    """clamp(rewards, -limit, limit). (B,) -> (B,); limit > 0."""
    if not limit > 0:
        raise ValueError(f"reward clip limit must be > 0, got {limit}")
    return torch.clamp(rewards, -limit, limit)


class RunningMoments:
    """Running mean and population variance of every value seen, across batches.

    Each batch x_1..x_n is folded in with Chan et al.'s parallel combination of (count, mean, M2),
    M2 = sum (x - mean)^2:

        delta  = mean_b - mean
        count' = count + n
        mean'  = mean + delta * n / count'
        M2'    = M2 + M2_b + delta^2 * count * n / count'

    so batch after batch gives the mean and std of the concatenation. Arithmetic is in float64.
    std is the population std, sqrt(M2 / count).
    """

    def __init__(self) -> None:
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0

    def update(self, values: torch.Tensor) -> None:
        """Fold in one batch (any shape; all elements count). Empty batches change nothing;
        non-finite values are refused (ValueError) because they would poison the state for good."""
        batch = values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        n = batch.numel()
        if n == 0:
            return
        if not bool(torch.isfinite(batch).all()):
            raise ValueError("RunningMoments.update got a non-finite value (nan or inf)")
        batch_mean = batch.mean().item()
        batch_m2 = ((batch - batch_mean) ** 2).sum().item()
        total = self._count + n
        delta = batch_mean - self._mean
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta * delta * self._count * n / total
        self._count = total

    @property
    def count(self) -> int:
        return self._count

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        """Population std sqrt(M2 / count); 0.0 before any value."""
        return math.sqrt(self._m2 / self._count) if self._count else 0.0

    def normalise(self, values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """(values - mean) / max(std, eps), same shape and dtype as values. Refused before any update."""
        if self._count == 0:
            raise ValueError("RunningMoments.normalise before any update: no mean or std yet")
        return (values - self._mean) / max(self.std, eps)

    def state_dict(self) -> dict:
        return {"count": self._count, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, d: dict) -> None:
        count, m2 = int(d["count"]), float(d["m2"])
        if count < 0 or m2 < 0:
            raise ValueError(f"RunningMoments state needs count >= 0 and m2 >= 0, got count={count}, m2={m2}")
        self._count = count
        self._mean = float(d["mean"])
        self._m2 = m2


def length_normalised_reward(rewards: torch.Tensor, response_lengths: torch.Tensor) -> torch.Tensor:
    """rewards / response_lengths, the per-token form of a sequence reward. (B,), (B,) -> (B,)

    Lengths count response tokens; any length < 1 is a ValueError.
    """
    if rewards.shape != response_lengths.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and response_lengths {tuple(response_lengths.shape)} "
            f"must have the same (B,) shape"
        )
    if bool((response_lengths < 1).any()):
        raise ValueError(f"every response length must be >= 1, got {response_lengths.tolist()}")
    return rewards / response_lengths.to(rewards.dtype)


def truncation_penalty(rewards: torch.Tensor, truncated: torch.Tensor, penalty: float) -> torch.Tensor:
    """rewards - penalty * truncated. (B,), (B,) bool -> (B,)

    truncated marks responses that hit max_new_tokens without EOS; they lose penalty, others are unchanged.
    """
    if truncated.dtype != torch.bool:
        raise TypeError(f"truncated must be a bool tensor, got {truncated.dtype}")
    if rewards.shape != truncated.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and truncated {tuple(truncated.shape)} must have the same (B,) shape"
        )
    return rewards - penalty * truncated.to(rewards.dtype)


def overlong_penalty(
    rewards: torch.Tensor, response_lengths: torch.Tensor, max_length: int, band: int, coef: float
) -> torch.Tensor:
    """rewards + coef * R_length(|y|), DAPO's soft overlong punishment (Yu et al. 2025, eq. 13).
    (B,), (B,) -> (B,)

    With L_max = max_length (the response cap, policy.max_new_tokens) and L_cache = band:

        R_length(|y|) = 0                                  if |y| <= L_max - L_cache
                      = (L_max - L_cache - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                      = -1                                 if L_max < |y|

    so the penalty grows linearly from 0 to coef across the last `band` tokens before the cap.
    Lengths count response tokens (EOS included when emitted); 1 <= band <= max_length.
    """
    if rewards.shape != response_lengths.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and response_lengths {tuple(response_lengths.shape)} "
            f"must have the same (B,) shape"
        )
    if not 1 <= band <= max_length:
        raise ValueError(f"the overlong band must hold 1 to max_length={max_length} tokens, got {band}")
    start = max_length - band  # the last length that goes unpunished
    excess = (response_lengths.to(rewards.dtype) - start) / band  # (B,) <= 0 before the band, 1 at the cap
    return rewards - coef * excess.clamp(0.0, 1.0)
