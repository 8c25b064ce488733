"""PPO math, as the seed article lays it out. Pure functions over tensors: no I/O, no config.

Shapes: B rollouts, T token positions (positions t predict token t+1 of prompt+response).
Every reduction over tokens takes the response mask, so prompt and padding never count.
"""
from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) over dim (all dims when None)."""
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask) over dim (all dims when None)."""
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(pi || pi_ref) per response token: (log pi(a_t) - log pi_ref(a_t)) * mask.

    logprobs, ref_logprobs, response_mask: (B, T) -> (B, T), zero outside the response.
    Sampled from pi, its expectation is the exact KL; single tokens may be negative.
    """
    return (logprobs - ref_logprobs) * response_mask


def sequence_kl(token_kl: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """KL of each response: sum over its tokens. (B, T) -> (B,)"""
    return masked_sum(token_kl, response_mask, dim=-1)


def kl_penalised_reward(reward: torch.Tensor, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """total reward = reward - beta * KL, per response. (B,), (B,) -> (B,)"""
    return reward - kl_coef * kl


def batch_mean_advantage(total_reward: torch.Tensor) -> torch.Tensor:
    """The seed's simplest advantage: A_i = R_i - mean_j R_j, within the batch. (B,) -> (B,)"""
    return total_reward - total_reward.mean()


def clipped_policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, to minimise:

        ratio_t = exp(log pi_new(a_t) - log pi_old(a_t))
        loss    = mean_t over response tokens of max(-A * ratio_t, -A * clip(ratio_t, 1 - eps, 1 + eps))

    new_logprobs, old_logprobs, response_mask: (B, T); advantages: (B,), the sequence's
    advantage given to each of its tokens. Returns (loss, stats) with stats:
    clip_fraction (share of tokens whose ratio was clipped in the direction that binds) and
    approx_kl (k3 estimate of KL(pi_old || pi_new): mean of (ratio - 1) - log ratio).
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    token_advantage = advantages.unsqueeze(-1)  # (B, 1) broadcast over tokens
    unclipped = -token_advantage * ratio
    clipped = -token_advantage * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), response_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), response_mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask)  # (ratio - 1) - log ratio, never < 0
    return loss, {"clip_fraction": clip_fraction, "approx_kl": approx_kl}
