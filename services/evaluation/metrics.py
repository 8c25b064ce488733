"""Evaluation metrics as pure functions: is the model better by the reward, and still a normal model?
The statistics of texts and samples it shares with the trainer live in common/sample_statistics.py."""

from __future__ import annotations

import math

import torch


def perplexity(token_nll_sum: float, token_count: int) -> float:
    """exp(total negative log-likelihood / number of predicted tokens)."""
    if token_count < 1:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(token_nll_sum / token_count)


def text_nll(model, tokenizer, texts: list[str]) -> tuple[float, int]:
    """Sum of −log p(token | preceding tokens) over every text (each scored on its own, the first
    token unpredicted) and the number of tokens predicted. Teacher-forced, no grad."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            if ids.shape[1] < 2:
                continue
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
            total -= float(log_probs.gather(-1, ids[0, 1:].unsqueeze(-1)).sum())
            count += ids.shape[1] - 1
    return total, count


def exact_kl_per_token(policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(π‖π_ref) at each position from full rows: Σ_v π(v)(log π(v) − log π_ref(v)). (T, V) -> (T,)"""
    return (policy_log_probs.exp() * (policy_log_probs - ref_log_probs)).sum(-1)
