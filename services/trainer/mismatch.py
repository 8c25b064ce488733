"""The sampler/trainer mismatch (issue #14): the policy service samples with one precision and
kernel (bfloat16, an incremental decode with a KV cache), the trainer computes with another
(float32 master weights under autocast, one full forward), so the behaviour log-probs the rollouts
carry are not exactly the trainer's, even on the same weights.

With r_t = log pi_trainer_old(a_t|s_t) - log pi_behaviour(a_t|s_t) on response tokens (pi_trainer_old:
the trainer's weights before this update, computed without grad):
- mean_abs = mean |r_t|, the gap in log-prob units;
- k3 = mean (exp(r_t) - 1 - r_t), Schulman's k3 estimator of KL(pi_behaviour || pi_trainer_old) on
  tokens sampled from pi_behaviour: never negative, 0 exactly when the two agree.

Truncated importance sampling (TIS; veRL PR #2953, TRL's vLLM importance-sampling correction): the
tokens were drawn from pi_behaviour but the PPO objective is written for pi_trainer_old, so each
token's loss is weighted by w_t = min(exp(r_t), C), C = trainer.tis_cap, without grad. The cap
bounds the variance a token the trainer finds far likelier than the sampler did could add.
"""

from __future__ import annotations

import torch

from .masking import masked_mean, where_mask


def logprob_mismatch(
    trainer_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[float, float]:
    """(mean_abs, k3) over response tokens. All (B, T); mask 1 on response tokens."""
    with torch.no_grad():
        ratio_log = where_mask(trainer_logprobs - behaviour_logprobs, mask)
        mean_abs = masked_mean(ratio_log.abs(), mask)
        k3 = masked_mean(torch.expm1(ratio_log) - ratio_log, mask)
    return float(mean_abs), float(k3)


def truncated_importance_weights(
    trainer_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """w_t = min(pi_trainer_old / pi_behaviour, cap) per token, 0 off the response, no grad. (B, T) -> (B, T)"""
    if cap <= 0:
        raise ValueError(f"tis_cap must be positive, got {cap}")
    ratio_log = where_mask(trainer_logprobs - behaviour_logprobs, mask)
    weights = torch.exp(ratio_log.detach()).clamp(max=cap)
    return where_mask(weights, mask)
