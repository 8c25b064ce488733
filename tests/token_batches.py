"""Batches over token positions for the PPO math's tests: ragged rows with contiguous responses, and
junk (nan, inf, huge) at the masked positions that must never reach a result."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

FINITE = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)
JUNK = [float("nan"), float("inf"), -float("inf"), 1e30, -7.5]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def rows_mask(starts_lengths, T):
    return [[1 if s <= i < s + n else 0 for i in range(T)] for s, n in starts_lengths]


@st.composite
def ragged(draw, min_len=0):
    """(mask, rewards, values) lists of B rows over T positions, each response contiguous."""
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 8))
    spans = []
    for _ in range(B):
        start = draw(st.integers(0, T - min_len))
        spans.append((start, draw(st.integers(min_len, T - start))))
    rewards = draw(st.lists(st.lists(FINITE, min_size=T, max_size=T), min_size=B, max_size=B))
    values = draw(st.lists(st.lists(FINITE, min_size=T, max_size=T), min_size=B, max_size=B))
    return rows_mask(spans, T), rewards, values


def with_junk(rows, mask):
    """A copy of rows where every masked-out position holds junk (nan, inf, huge)."""
    out = [row[:] for row in rows]
    k = 0
    for b, mrow in enumerate(mask):
        for i, m in enumerate(mrow):
            if not m:
                out[b][i] = JUNK[k % len(JUNK)]
                k += 1
    return out
