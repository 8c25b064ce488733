"""Greedy degeneration of one answer, as pure functions of its text: what a person reading a canary
answer looks for (the same sentence over and over, an answer that no longer fits the question).
Computed by the policy for each canary answer (services/policy/canaries.py), reduced to a verdict by
`is_degenerate` against bounds from the config (policy.canary_*).

Words are whitespace-separated, as in sample_statistics.py. Sampled responses at temperature 1.0
hide what greedy decoding shows, which is why these are taken on the greedy canary answers.
"""

from __future__ import annotations

import math
import zlib

from .sample_statistics import repetition

REPEATED_NGRAM = 3  # word 3-grams: one repeated word or word pair is normal speech, a repeated triple rarely
NAN = float("nan")


def repeated_ngram_share(text: str) -> float:
    """1 − distinct/total over the text's word 3-grams (0 for fewer than 3 words): the share of
    3-grams that repeat an earlier one. The same 8-word sentence four times: 1 − 8/30."""
    return repetition(text, REPEATED_NGRAM)


def longest_repeated_span(text: str) -> int:
    """Words in the longest run of consecutive words that occurs at least twice in the text, the
    occurrences allowed to overlap ("a a a": 2); 0 when no word occurs twice. Longest common prefix
    of two suffixes starting at different words, by dynamic programming over word pairs (i < j):
    L(i, j) = L(i+1, j+1) + 1 if word i == word j, else 0."""
    words = text.split()
    n, longest = len(words), 0
    following = [0] * (n + 1)  # L(i+1, j+1) for every j, from the row below
    for i in range(n - 1, -1, -1):
        row = [0] * (n + 1)
        for j in range(n - 1, i, -1):
            if words[i] == words[j]:
                row[j] = following[j + 1] + 1
                longest = max(longest, row[j])
        following = row
    return longest


def compression_ratio(text: str) -> float:
    """len(utf8) / len(zlib.compress(utf8, 9)): how many times zlib shrinks the text; repeated
    spans compress, so a looping answer scores high (Whisper uses the same measure, with gzip, to
    reject looping transcriptions). Short texts score under 1 (zlib's own header and checksum);
    NaN for an empty text."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw, 9)) if raw else NAN


def length_ratio(length: int, first_length: int) -> float:
    """This answer's length over version 0's answer's (tokens); NaN when version 0's was empty."""
    return length / first_length if first_length > 0 else NAN


def cosine(a: list[float], b: list[float]) -> float:
    """a·b / (|a| |b|); NaN when either is the zero vector."""
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norms if norms > 0 else NAN


def is_degenerate(
    share: float,
    first_share: float,
    relevance: float,
    relevance_change: float,
    repetition_bound: float,
    relevance_drop_bound: float,
    relevance_floor: float,
) -> bool:
    """The verdict on one answer, against version 0's answer to the same prompt:
    - it repeats: its repeated 3-gram share is above `repetition_bound` and above version 0's
      share (an answer the starting model already looped on only counts once it loops more: the
      verdict is on what training did, and a small model loops on some prompts from the start);
    - or it drifted off the question: its relevance fell more than `relevance_drop_bound` below
      version 0's (relevance_change < −bound) AND is below `relevance_floor`. The floor is there
      because two normal answers to one prompt differ in relevance by 0.4 and more (MiniLM, SmolLM2:
      "Tell me about your weekend." answered on topic at 0.38 and at 0.28, a Bora Bora weekend, after
      0.71 at version 0), while the answers that no longer fit the question ("How was your day at
      work?" answered with condolences or a refusal) sat at 0.17-0.22 (16-iteration demos, 2026-11-30).
      The margin is thin: MiniLM's cosine is a weak judge of fit, so repetition is the main signal.
    NaN compares false and never makes an answer degenerate."""
    repeats = share > repetition_bound and share > first_share
    return repeats or (relevance_change < -relevance_drop_bound and relevance < relevance_floor)
