"""What every reward backend is and answers: the RewardBackend protocol, and its scores checked to be
one finite float per (prompt, response) pair, with errors that name the backend."""

from __future__ import annotations

import math
from typing import Protocol


class RewardBackend(Protocol):
    model_id: str
    revision: str

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
        """One raw score per (prompt, response) pair, in order. `metadata`: one dict per pair, the
        prompt row's carried columns (data.metadata_columns; {} for a row without), or None when the
        caller sent none; a backend that has no use for it ignores it."""


class RewardBackendError(RuntimeError):
    """A backend that answered wrongly or not at all; the message says which backend and what went wrong."""


def check_scores(values, count: int, who: str) -> list[float]:
    """`values` as a list of `count` finite floats; RewardBackendError naming `who` otherwise."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        raise RewardBackendError(
            f"{who} returned {type(values).__name__} {short_repr(values)}: expected a list of {count} floats"
        )
    if len(values) != count:
        raise RewardBackendError(
            f"{who} returned {len(values)} scores for {count} (prompt, response) pairs: "
            "expected exactly one per pair, in order"
        )
    scores = []
    for index, value in enumerate(values):
        if isinstance(value, (str, bytes, bool)) or not hasattr(value, "__float__"):
            raise RewardBackendError(
                f"{who} returned a non-numeric score at index {index}: {short_repr(value)} ({type(value).__name__})"
            )
        number = float(value)
        if not math.isfinite(number):
            raise RewardBackendError(f"{who} returned a non-finite score at index {index}: {number}")
        scores.append(number)
    return scores


def short_repr(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
