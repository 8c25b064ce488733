"""PPO math, as the seed article lays it out. Pure functions over tensors: no I/O, no config.
The policy loss and the critic's (value) loss, side by side. KL estimators live in kl.py, advantages
in advantages.py, reward shaping in reward_shaping.py, the masked reductions in masking.py.

Shapes: B rollouts, T token positions (positions t predict token t+1 of prompt+response).
Every reduction over tokens takes the response mask, so prompt and padding never count (masking.py:
selected away, so not even an inf or nan there can leak in).
"""

from __future__ import annotations

import math

import torch

from .masking import masked_mean, masked_sum


def sequence_kl(token_kl: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """KL of each response: sum over its tokens. (B, T) -> (B,)"""
    return masked_sum(token_kl, response_mask, dim=-1)


def kl_penalised_reward(reward: torch.Tensor, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """total reward = reward - beta * KL, per response. (B,), (B,) -> (B,)"""
    return reward - kl_coef * kl


def aggregate_loss(token_losses: torch.Tensor, response_mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Reduce per-token losses (B, T) to a scalar.

    token_mean:    sum over all response tokens / number of response tokens (long answers weigh more)
    sequence_mean: mean over sequences of each sequence's mean over its tokens (each answer weighs 1/B)
    """
    if aggregation == "token_mean":
        return masked_mean(token_losses, response_mask)
    if aggregation == "sequence_mean":
        return masked_mean(token_losses, response_mask, dim=-1).mean()
    raise ValueError(f"unknown loss aggregation {aggregation!r} (known: token_mean, sequence_mean)")


def clipped_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float,
    aggregation: str = "token_mean",
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, to minimise:

        ratio_t = exp(log pi_new(a_t) - log pi_old(a_t))
        loss    = aggregate over response tokens of w_t * max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

    w_t = 1, or token_weights (B, T): truncated importance weights (mismatch.py), no grad.

    new_logprobs, old_logprobs, response_mask: (B, T); advantages: (B,), a sequence's advantage
    given to each of its tokens, or (B, T) per token (GAE). Returns (loss, stats) with stats:
    clip_fraction (share of tokens whose ratio was clipped in the direction that binds) and
    approx_kl (k3 estimate of KL(pi_old || pi_new): mean of (ratio - 1) - log ratio).
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    token_advantage = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    unclipped = -token_advantage * ratio
    clipped = -token_advantage * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    loss = aggregate_loss(per_token, response_mask, aggregation)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), response_mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask)  # (ratio - 1) - log ratio, never < 0
    return loss, {"clip_fraction": clip_fraction, "approx_kl": approx_kl}


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss, to minimise:

        V_clip = clip(V, V_old - c, V_old + c)
        loss   = 0.5 * mean_t over response tokens of max((V - R)^2, (V_clip - R)^2)

    values, old_values, returns, response_mask: (B, T). Returns (loss, clip_fraction), both
    scalars; clip_fraction is the share of response tokens where the clipped term is strictly
    the larger (the clip binds, so that token's gradient is 0). Prompt and padding never count
    and get no gradient.
    """
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), response_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_sq > unclipped_sq).to(loss.dtype), response_mask)
    return loss, clip_fraction


def lr_factor(step: int, warmup_steps: int, decay_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based):

    warm-up:  (step + 1) / warmup_steps              while step < warmup_steps
    constant: 1
    linear:   max(0, 1 - s / decay_steps)             s = step - warmup_steps
    cosine:   0.5 * (1 + cos(pi * min(s, decay_steps) / decay_steps))
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r} (known: constant, linear, cosine)")
