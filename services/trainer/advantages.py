"""Advantage estimators for PPO. Pure functions over tensors: no I/O, no config, no globals.

Shapes: B rollouts, T token positions (positions t predict token t+1 of prompt+response).
response_mask (B, T) is 1 on positions that predict a response token and 0 on prompt and
padding; each row's response is contiguous, positions [start_b, start_b + len_b). Masks may be
bool, int or float. Every reduction over tokens takes the response mask, and values at masked
positions never reach a result (masking.py selects them away, so even inf or nan there cannot
leak in through 0 * inf).

Sequence-level estimators ((B,) -> (B,)): batch_mean, group (GRPO when scaled by std), rloo.
Token-level estimator ((B, T) -> (B, T)): gae, fed by token_rewards and a value head.
"""

from __future__ import annotations

import torch

from .masking import masked_mean, where_mask

ADVANTAGE_ESTIMATORS = ("batch_mean", "group", "rloo", "gae")


# --- helpers --------------------------------------------------------------------------------


def _group_stats(
    total_reward: torch.Tensor, group_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rollout view of its group: (inverse index (B,), group sizes (G,), group sums (G,)).

    group_index may hold any integer labels (not necessarily 0..G-1); they are renumbered.
    """
    if total_reward.dim() != 1 or group_index.shape != total_reward.shape:
        raise ValueError(
            f"total_reward and group_index must both be (B,), got "
            f"{tuple(total_reward.shape)} and {tuple(group_index.shape)}"
        )
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    counts = torch.zeros(num_groups, dtype=total_reward.dtype, device=total_reward.device)
    counts = counts.index_add(0, inverse, torch.ones_like(total_reward))
    sums = torch.zeros(num_groups, dtype=total_reward.dtype, device=total_reward.device)
    sums = sums.index_add(0, inverse, total_reward)
    return inverse, counts, sums


# --- sequence-level advantages --------------------------------------------------------------


def batch_mean_advantage(total_reward: torch.Tensor) -> torch.Tensor:
    """The seed's simplest baseline: A_i = R_i - mean_j R_j over the whole batch. (B,) -> (B,)"""
    return total_reward - total_reward.mean()


def group_advantage(
    total_reward: torch.Tensor, group_index: torch.Tensor, scale_by_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantage (several samples per prompt share a group):

        A_i = R_i - mean_{j in g(i)} R_j
        with scale_by_std (GRPO):  A_i = (R_i - mean_g) / (std_g + eps)

    std_g is the population standard deviation of the group (divide by n, not n - 1), so a
    group whose rewards are all equal, a singleton included, gets A = 0.
    total_reward: (B,) float; group_index: (B,) integer labels of each rollout's group -> (B,).
    """
    inverse, counts, sums = _group_stats(total_reward, group_index)
    group_mean = sums / counts.clamp(min=1)
    centred = total_reward - group_mean[inverse]
    if not scale_by_std:
        return centred
    squares = torch.zeros_like(counts).index_add(0, inverse, centred * centred)
    group_std = torch.sqrt(squares / counts.clamp(min=1))
    return centred / (group_std[inverse] + eps)


def rloo_advantage(total_reward: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: the baseline of sample i is the mean of the other samples of its group,

        A_i = R_i - (1 / (n_g - 1)) * sum_{j in g(i), j != i} R_j  =  n_g / (n_g - 1) * (R_i - mean_g)

    A group of size 1 has no other sample to form a baseline from, so its advantage is 0
    (the rollout contributes no policy gradient), not R_i.
    total_reward: (B,) float; group_index: (B,) integer labels -> (B,).
    """
    inverse, counts, sums = _group_stats(total_reward, group_index)
    n = counts[inverse]
    others_mean = (sums[inverse] - total_reward) / (n - 1).clamp(min=1)
    return torch.where(n > 1, total_reward - others_mean, torch.zeros_like(total_reward))


# --- whitening ------------------------------------------------------------------------------


def whiten(
    values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise over the masked entries (all entries when mask is None):

        mean = sum_m(v) / N,   var = sum_m((v - mean)^2) / N      (population variance)
        out  = (v - mean) / sqrt(var + eps)                        (shift_mean=True)
        out  = (v - mean) / sqrt(var + eps) + mean                 (shift_mean=False, TRL's convention)

    Any shape -> same shape. Entries where mask is 0 come back as 0 (not unchanged), so the
    output can be summed or fed on without masking again; they never affect mean or var.
    A single masked entry (var = 0) whitens to 0 (+ mean).
    """
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    mean = masked_mean(values, mask)
    centred = values - mean
    var = masked_mean(centred * centred, mask)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return where_mask(out, mask)


# --- token-level rewards and GAE ------------------------------------------------------------


def token_rewards(
    score: torch.Tensor, kl_per_token: torch.Tensor, kl_coef: float, response_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token reward for GAE (the KL penalty is paid per token, the score once at the end):

        r_{b,t} = -kl_coef * kl_{b,t}                 on response tokens
        r_{b,last_b} += score_b                       last_b = last response position of row b
        r_{b,t} = 0                                   on prompt and padding

    score: (B,); kl_per_token, response_mask: (B, T) -> (B, T). A row with no response token
    has nowhere to put its score and comes back all zero.
    """
    mask = response_mask.bool()
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1).values  # (B,), -1 if empty
    is_last = positions.unsqueeze(0) == last.unsqueeze(-1)  # (B, T); all False on empty rows (last = -1)
    dtype = torch.promote_types(score.dtype, kl_per_token.dtype)
    rewards = where_mask(-kl_coef * kl_per_token.to(dtype), mask)
    return rewards + where_mask(score.to(dtype).unsqueeze(-1).expand_as(rewards), is_last)


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation over each row's response tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t        V_{t+1} = 0 after the last response token
        A_t     = delta_t + gamma * lam * A_{t+1}    A = 0 after the last response token
        returns = A + V

    rewards, values, response_mask: (B, T) -> (advantages, returns), both (B, T), 0 outside the
    response. Rewards and values at prompt and padding positions are never read (replaced by 0
    before use), so the value head's outputs there cannot leak in. The recursion runs backwards
    over T columns, vectorised over B; a masked position resets it, so a (non-contiguous) gap in
    a mask would act as an episode end. lam = 1 gives reward-to-go minus V (Monte Carlo); lam = 0
    gives the one-step TD error.
    """
    mask = response_mask.bool()
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    r = where_mask(rewards.to(dtype), mask)
    v = where_mask(values.to(dtype), mask)
    T = r.shape[-1]
    next_value = torch.zeros_like(r[..., 0])
    next_advantage = torch.zeros_like(r[..., 0])
    columns: list[torch.Tensor] = []
    for t in reversed(range(T)):
        delta = r[..., t] + gamma * next_value - v[..., t]
        advantage = where_mask(delta + gamma * lam * next_advantage, mask[..., t])
        columns.append(advantage)
        next_advantage = advantage  # 0 on a masked position: the recursion restarts there
        next_value = v[..., t]  # already 0 on masked positions
    advantages = torch.stack(columns[::-1], dim=-1)
    returns = where_mask(advantages + v, mask)
    return advantages, returns


def sequence_advantage_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Give each sequence's advantage to every one of its response tokens: A_{b,t} = A_b * m_{b,t}.

    advantages: (B,); response_mask: (B, T) -> (B, T), 0 on prompt and padding.
    """
    return where_mask(advantages.unsqueeze(-1).expand(response_mask.shape), response_mask)
