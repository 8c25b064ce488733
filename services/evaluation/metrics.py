"""Evaluation metrics as pure functions: is the model better by the reward, and still a normal model?"""

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


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams, over every text together (whitespace words). 0 when there are none."""
    grams = [gram for text in texts for gram in ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = 3) -> float:
    """Share of a text's word n-grams that repeat an earlier one: 1 − unique/all (0 for none)."""
    grams = ngrams(text.split(), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def exact_kl_per_token(policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(π‖π_ref) at each position from full rows: Σ_v π(v)(log π(v) − log π_ref(v)). (T, V) -> (T,)"""
    return (policy_log_probs.exp() * (policy_log_probs - ref_log_probs)).sum(-1)


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation of two equal-length samples; 0.0 when either is constant (no linear relation
    can be seen), so a batch of equal lengths never reads as NaN."""
    n = len(xs)
    if n < 2 or n != len(ys):
        return 0.0
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    var_x = sum((x - mean_x) ** 2 for x in xs)
    var_y = sum((y - mean_y) ** 2 for y in ys)
    return cov / math.sqrt(var_x * var_y) if var_x > 0 and var_y > 0 else 0.0
