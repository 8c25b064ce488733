"""Statistics of samples as pure functions, of texts (distinct-n, repetition) and of numbers (mean and
spread, Pearson correlation): shared by the trainer's step summary, its detectors and the evaluation."""

from __future__ import annotations

import math


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
