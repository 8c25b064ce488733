"""One PPO update on a batch of rollouts, in the seed's order: (1) the reward, shaped as
configured; (2) the policy as it stands, where the critic or the exact KL needs it; (3) the KL
between the policy that sampled and the frozen reference, response tokens only; (4) total reward
= reward − β·KL and the advantage; (5) clipped PPO epochs over minibatches, gradient clipping
always on, non-finite minibatches skipped; (6) β for the next update.

The objects it changes (policy, critic, optimizer, schedule, KL controller, reward normaliser,
shuffle generator) belong to the Trainer, which saves and restores them."""

from __future__ import annotations

import collections
import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..common.config import TrainerConfig
from ..common.rollout_queue import Rollout
from ..common.sample_statistics import distinct_n, pearson, repetition
from ..common.step_records import UpdateStats
from . import ppo
from .advantages import (
    batch_mean_advantage,
    gae_advantages,
    group_advantage,
    rloo_advantage,
    sequence_advantage_to_tokens,
    token_rewards,
    whiten,
)
from .batch import PPOBatch, collate
from .kl import exact_kl_from_rows, per_token_kl
from .masking import masked_mean, where_mask
from .mismatch import logprob_mismatch, truncated_importance_weights
from .rank_share import Share, rank_share, record_figures
from .reward_shaping import (
    RunningMoments,
    clip_reward,
    length_normalised_reward,
    overlong_penalty,
    truncation_penalty,
)

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def shape_rewards(section: TrainerConfig, moments: RunningMoments, data: PPOBatch, max_new_tokens: int) -> torch.Tensor:
    """Raw scores -> the reward PPO maximises, in this order: running normalisation, clipping,
    length normalisation, truncation penalty, overlong penalty (each off unless configured); the
    overlong band ends at max_new_tokens, the policy's response cap. (B,) -> (B,)"""
    rewards = data.rewards
    if section.reward_normalize:
        moments.update(rewards)
        rewards = moments.normalise(rewards)
    if section.reward_clip is not None:
        rewards = clip_reward(rewards, section.reward_clip)
    if section.length_normalize:
        rewards = length_normalised_reward(rewards, data.response_lengths)
    if section.truncation_penalty:
        rewards = truncation_penalty(rewards, data.truncated, section.truncation_penalty)
    if section.overlong_penalty:  # DAPO's soft overlong punishment, in the reward's own units
        rewards = overlong_penalty(
            rewards, data.response_lengths, max_new_tokens, section.overlong_band_tokens, section.overlong_penalty
        )
    return rewards


def token_kl(
    estimator: str, logprobs: torch.Tensor, data: PPOBatch, policy_rows: torch.Tensor | None, vocab_size: int
) -> torch.Tensor:
    """KL(policy || reference) per response token with the configured estimator; `policy_rows`, the
    policy's log-probs at the reference's top-k ids (B, T, K), only for 'full'. (B, T) -> (B, T)"""
    if estimator != "full":
        return per_token_kl(estimator, logprobs, data.ref_logprobs, data.response_mask)
    if data.ref_top_ids.shape[-1] == 0:
        raise ValueError("kl_estimator 'full' needs rollouts carrying the reference's top-k rows")
    full_vocabulary = data.ref_top_ids.shape[-1] == vocab_size
    return exact_kl_from_rows(policy_rows, data.ref_top_logprobs, data.response_mask, renormalise=not full_vocabulary)


def advantages_and_returns(
    section: TrainerConfig,
    scores: torch.Tensor,
    kl_per_token: torch.Tensor,
    kl: torch.Tensor,
    reward_beta: float,
    old_values: torch.Tensor | None,
    data: PPOBatch,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Total reward = reward − β·KL (β = 0 when the KL is paid in the loss) and the advantage with
    the configured estimator. scores, kl (B,), kl_per_token (B, T) -> advantages (B, T), returns
    (B, T) (GAE only, else None), total reward (B,)."""
    mask = data.response_mask
    if section.advantage == "gae":
        rewards_t = token_rewards(scores, kl_per_token, reward_beta, mask)
        advantages, returns = gae_advantages(rewards_t, old_values, mask, section.gamma, section.lam)
        total_reward = scores - reward_beta * kl
    else:
        returns = None
        total_reward = ppo.kl_penalised_reward(scores, kl, reward_beta)  # (B,)
        if section.advantage == "batch_mean":
            sequence_advantages = batch_mean_advantage(total_reward)
        elif section.advantage == "group":
            sequence_advantages = group_advantage(total_reward, data.group_index, section.group_scale_by_std)
        else:
            sequence_advantages = rloo_advantage(total_reward, data.group_index)
        advantages = sequence_advantage_to_tokens(sequence_advantages, mask)  # (B, T)
    if section.whiten_advantages:
        advantages = whiten(advantages, mask)
    return advantages, returns, total_reward


def measures_mismatch(trainer: Trainer) -> bool:
    """trainer.measure_mismatch, where null is: on CUDA (bfloat16 sampling); always under TIS, which needs it."""
    section = trainer.section
    if section.tis_cap is not None:
        return True
    return section.measure_mismatch if section.measure_mismatch is not None else trainer.device.type == "cuda"


def forward(trainer: Trainer, data: PPOBatch):
    """The policy (and critic) on a batch, at response positions only: (logprobs (B, T), entropy (B, T),
    the log-probs at the reference's top-k ids (B, T, K) for kl_estimator 'full' else None, values
    (B, T) or None). The head runs on chunks of trainer.logprob_chunk_positions response positions
    (services/common/token_logprobs.py): no (B, T, V) tensor is ever made."""
    section, dtype = trainer.section, trainer.compute_dtype
    top_ids = data.ref_top_ids if section.kl_estimator == "full" else None
    with torch.autocast(trainer.device.type, dtype, enabled=dtype != torch.float32):
        return trainer.learner(  # the policy and critic, through the DDP / FSDP2 wrapper when there is one
            data.input_ids,
            data.attention_mask,
            data.response_mask,
            section.temperature,
            section.logprob_chunk_positions,
            top_ids,
        )


def ppo_update(trainer: Trainer, rollouts: list[Rollout]) -> UpdateStats:
    """One PPO update on a batch; returns what it saw and did. Skips minibatches with a non-finite loss/grad."""
    section = trainer.section
    data = collate(rollouts, trainer.tokenizer.pad_token_id, trainer.device)
    mask = data.response_mask
    beta = trainer.kl_controller.value
    # 1. The reward: raw scores, shaped as configured (the seed's default: unchanged).
    scores = shape_rewards(section, trainer.reward_moments, data, trainer.config.policy.max_new_tokens)
    # 2. The policy as it stands (= the weights that sampled, for fresh rollouts): old values for
    #    the critic and the policy's full distribution for the exact KL; skipped when neither is used.
    #    With measure_mismatch or tis_cap, the same pass gives the sampler/trainer mismatch (mismatch.py).
    policy_rows, old_values, mismatch, tis = None, None, (float("nan"), float("nan")), {}
    if trainer.value_head is not None or section.kl_estimator == "full" or measures_mismatch(trainer):
        with torch.no_grad():
            trainer_old, _, policy_rows, old_values = forward(trainer, data)
        if measures_mismatch(trainer):
            mismatch = logprob_mismatch(trainer_old, data.old_logprobs, mask)
        if section.tis_cap is not None:
            tis = {
                "old_logprobs": trainer_old,
                "tis_weights": truncated_importance_weights(trainer_old, data.old_logprobs, mask, section.tis_cap),
            }
    # 3. KL between the policy that sampled and the frozen reference, response tokens only.
    vocab_size = trainer.model.get_output_embeddings().weight.shape[0]
    kl_per_token = token_kl(section.kl_estimator, data.old_logprobs, data, policy_rows, vocab_size)  # (B, T)
    kl = ppo.sequence_kl(kl_per_token, mask)  # (B,)
    # 4. Total reward = reward − β·KL (when the KL is paid in the reward), and the advantage.
    reward_beta = beta if section.kl_placement == "reward" else 0.0
    advantages, returns, total_reward = advantages_and_returns(
        section, scores, kl_per_token, kl, reward_beta, old_values, data
    )
    # 5. Clipped PPO epochs over minibatches, gradient clipping always on.
    targets = {"advantages": advantages, "returns": returns, "old_values": old_values, **tis}
    figures, stopped_early = ppo_epochs(trainer, data, len(rollouts), targets, beta)
    # 6. β for the next update (the adaptive controller moves it towards the target KL).
    kl_coef_next = trainer.kl_controller.update(float(kl.mean()), len(rollouts))
    for value in data.old_logprobs[mask.bool()].tolist():
        trainer.metrics.logprobs.observe(value)
    lr = trainer.scheduler.get_last_lr()[0]
    stats = update_stats(
        data, rollouts, scores, total_reward, kl_per_token, kl, beta, kl_coef_next, lr, figures, stopped_early
    )
    stats.logprob_mismatch_mean_abs, stats.logprob_mismatch_k3 = mismatch
    return stats


def ppo_epochs(
    trainer: Trainer, data: PPOBatch, size: int, targets: dict, beta: float
) -> tuple[dict[str, list[float]], bool]:
    """section.ppo_epochs passes over the batch in shuffled minibatches (under torchrun, each rank
    its share), stopped early once approx_kl passes early_stop_kl. Returns the per-minibatch
    figures and whether it stopped early."""
    figures = collections.defaultdict(list)
    try:
        stopped_early = epochs(trainer, data, size, targets, beta, figures)
    except torch.OutOfMemoryError as error:
        out_of_memory(trainer, figures, error)
        stopped_early = True
    if trainer.distributed is not None:  # the first minibatch's largest gap over every rank's rows
        mine = figures["first_minibatch_max_log_ratio"]
        largest = trainer.distributed.max(mine[0] if mine else -math.inf)
        figures["first_minibatch_max_log_ratio"] = [largest] if largest > -math.inf else []
    return figures, stopped_early


def out_of_memory(trainer: Trainer, figures: dict, error: Exception) -> None:
    """A CUDA out-of-memory in an update: the epochs stop where they are, the gradients and the
    allocator's cache are freed, and the trainer goes on with the next batch. With no optimizer step
    taken, the weights are untouched and Trainer.step sends the batch to the dropped stream (reason
    out_of_memory, every field kept); after some, the update stands with the steps it took."""
    trainer.optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trainer.metrics.out_of_memory.inc()
    figures["out_of_memory"].append(1)
    log.error(
        "CUDA out of memory in the update after %d optimizer steps (%s); lower trainer.minibatch_size or "
        "trainer.logprob_chunk_positions, or set trainer.gradient_checkpointing: true",
        len(figures["loss"]),
        str(error).splitlines()[0] if str(error) else type(error).__name__,
    )


def epochs(trainer: Trainer, data: PPOBatch, size: int, targets: dict, beta: float, figures: dict) -> bool:
    """The epochs' minibatches, each rank on its share (rank_share.py); True when stopped early."""
    section = trainer.section
    tokens_per_row = data.response_mask.sum(dim=-1).cpu()
    for _epoch in range(section.ppo_epochs):
        order = torch.randperm(size, generator=trainer.shuffle)
        for start in range(0, size, section.minibatch_size):
            share = rank_share(order[start : start + section.minibatch_size], trainer.distributed, tokens_per_row)
            rows = share.rows.to(trainer.device)
            minibatch_step(
                trainer,
                data.select(rows),
                {k: None if v is None else v[rows] for k, v in targets.items()},
                beta,
                figures,
                share,
            )
            # approx_kl is the whole minibatch's on every rank (reduced_figures): one decision for all
            if section.early_stop_kl is not None and figures["approx_kl"]:
                if figures["approx_kl"][-1] > section.early_stop_kl:
                    return True
    return False


def minibatch_loss(
    trainer: Trainer, data: PPOBatch, targets: dict, beta: float, figures: dict, share: Share
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The clipped policy loss (+ β·KL under kl_placement 'loss', − c·entropy with entropy_coef,
    + the value loss under GAE) on one minibatch, each term weighted by this rank's share (1 in one
    process). Returns (loss, the policy loss's info (+ 'value_loss' under GAE), entropy (B, T))."""
    section, mask = trainer.section, data.response_mask
    new_logprobs, entropy, policy_rows, values = forward(trainer, data)
    vocab_size = trainer.model.get_output_embeddings().weight.shape[0]
    if not figures["first_minibatch_max_log_ratio"]:  # 1 for fresh rollouts: a check on the whole pipeline
        figures["first_minibatch_max_log_ratio"].append(
            float(where_mask((new_logprobs - data.old_logprobs).abs(), mask).max().detach())
        )
    old_logprobs = targets.get("old_logprobs", data.old_logprobs)  # under TIS: the trainer's, not the sampler's
    loss, info = ppo.clipped_policy_loss(
        new_logprobs,
        old_logprobs,
        targets["advantages"],
        mask,
        section.clip_eps,
        section.loss_aggregation,
        targets.get("tis_weights"),
    )
    if section.kl_placement == "loss":  # GRPO style: the KL of the policy being trained, as a loss term
        kl_loss = ppo.aggregate_loss(
            token_kl(section.kl_estimator, new_logprobs, data, policy_rows, vocab_size), mask, section.loss_aggregation
        )
        loss = loss + beta * kl_loss
    if section.entropy_coef:  # exploration bonus (Schulman et al. 2017, eq. 9): higher entropy, lower loss
        loss = loss - section.entropy_coef * ppo.aggregate_loss(entropy, mask, section.loss_aggregation)
    loss = share.weight(section.loss_aggregation) * loss
    if values is not None:  # a mean over response tokens
        value_loss, _ = ppo.clipped_value_loss(
            values, targets["old_values"], targets["returns"], mask, section.value_clip
        )
        loss = loss + share.per_token * section.value_coef * value_loss
        info["value_loss"] = value_loss.detach()
    return loss, info, entropy


def minibatch_step(trainer: Trainer, data: PPOBatch, targets: dict, beta: float, figures: dict, share: Share) -> None:
    """Loss, backward (DDP / FSDP2 reduce the gradients there: the mean over ranks), gradient clipping
    and one optimizer step; skipped (and counted) when the loss or the gradient norm is not finite,
    on every rank when on any. Under ddp an out-of-memory in one rank's forward stops the epochs on
    every rank (ppo_epochs): its forward holds no collective. Under fsdp (whose forward gathers each
    block) and in any backward, the other ranks wait in a collective the failed rank never joins,
    until the process group times out. `share`: this rank's rows and their weights (rank_share.py)."""
    distributed, optimizer = trainer.distributed, trainer.optimizer
    out_of_memory = None
    try:
        loss, info, entropy = minibatch_loss(trainer, data, targets, beta, figures, share)
    except torch.OutOfMemoryError as error:
        if distributed is None:
            raise
        out_of_memory, loss = error, torch.tensor(float("nan"))  # the other ranks must hear of it first
    optimizer.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(loss))
    if distributed is not None:  # one rank's out-of-memory or NaN stops or skips every rank's step
        fits, finite = distributed.all_true_each([out_of_memory is None, finite])
        if not fits:  # before the backward and its gradient reduction, which a rank gone would hang
            raise out_of_memory or torch.OutOfMemoryError("out of memory on another rank in this minibatch")
    if not finite:
        return skip(trainer, figures, f"loss is {loss.item()}")
    loss_scale = trainer.loss_scale  # float16: S·loss in backward, gradients / S before clipping (loss_scale.py)
    loss_scale.scaled(loss).backward()
    loss_scale.unscale_(trainer.parameters)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.parameters, trainer.section.max_grad_norm)
    if isinstance(grad_norm, torch.distributed.tensor.DTensor):  # FSDP2: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):  # the same norm on every rank (reduced gradients): all skip together
        optimizer.zero_grad(set_to_none=True)
        if not loss_scale.can_back_off():
            return skip(trainer, figures, f"gradient norm is {grad_norm.item()}")
        loss_scale.overflowed()  # a finite loss, its scaled float16 gradients overflowed: S halves, not a NaN
        figures["skipped"].append(1)
        return
    loss_scale.stepped()
    optimizer.step()
    trainer.scheduler.step()
    record_figures(figures, trainer.distributed, loss, info, masked_mean(entropy.detach(), data.response_mask), share)
    figures["grad_norm"].append(grad_norm.item())
    figures["skipped"].append(0)


def skip(trainer: Trainer, figures: dict, why: str) -> None:
    log.error("non-finite update skipped: %s", why)
    trainer.metrics.nonfinite_skips.inc()
    figures["skipped"].append(1)


def update_stats(
    data: PPOBatch,
    rollouts: list[Rollout],
    scores: torch.Tensor,
    total_reward: torch.Tensor,
    kl_per_token: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    kl_coef_next: float,
    lr: float,
    figures: dict[str, list[float]],
    stopped_early: bool,
) -> UpdateStats:
    """What the batch was (its KL, rewards, lengths, and the seed's quiet failure modes: a reward
    that favours length, responses collapsing onto templates) and what the optimisation did
    (minibatch means; NaN when no minibatch stepped)."""
    mean = lambda key: float(np.mean(figures[key])) if figures[key] else float("nan")  # noqa: E731
    first_ratio = figures["first_minibatch_max_log_ratio"]
    return UpdateStats(
        kl_per_token=float(masked_mean(kl_per_token, data.response_mask)),
        kl_per_sequence=float(kl.mean()),
        kl_coef=beta,
        kl_coef_next=kl_coef_next,
        reward_mean=float(data.rewards.mean()),
        reward_std=float(data.rewards.std(unbiased=False)),
        shaped_reward_mean=float(scores.mean()),
        total_reward_mean=float(total_reward.mean()),
        response_length_mean=float(data.response_lengths.mean()),
        eos_fraction=float((~data.truncated).float().mean()),
        reward_length_correlation=pearson(data.rewards.tolist(), data.response_lengths.tolist()),
        distinct_2=distinct_n([r.response_text for r in rollouts], 2),
        repetition_3=float(np.mean([repetition(r.response_text, 3) for r in rollouts])),
        entropy=mean("entropy"),
        clip_fraction=mean("clip_fraction"),
        approx_kl=mean("approx_kl"),
        loss=mean("loss"),
        grad_norm=mean("grad_norm"),
        value_loss=mean("value_loss"),
        lr=lr,
        first_minibatch_max_log_ratio=first_ratio[0] if first_ratio else float("nan"),
        logprob_mismatch_mean_abs=float("nan"),  # set by ppo_update when measured
        logprob_mismatch_k3=float("nan"),
        early_stopped=stopped_early,
        out_of_memory=bool(figures["out_of_memory"]),
        optimizer_steps=len(figures["loss"]),
        skipped_minibatches=int(sum(figures["skipped"])),
    )
