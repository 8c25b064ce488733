"""Reward functions that provoke the seed's failure modes on purpose, for the `python` reward
backend (`reward.function: tests.rewards:<name>`), called as f(prompts, responses) -> scores."""

from __future__ import annotations

import difflib

PHRASE = "and it is good"  # five tokens of the tiny models' tokenizer (tests/tiny_models.py)


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """Pays for brevity: minus the response's length in characters, per 10 characters."""
    return [-len(response) / 10 for response in responses]


def one_phrase(prompts: list[str], responses: list[str]) -> list[float]:
    """Pays for one phrase whatever the prompt: the share of the response's words that are words of
    PHRASE, plus half its character similarity to PHRASE (difflib's ratio, 2·matches / total
    characters), which keeps the reward dense while a random model's words are still gibberish."""
    words = set(PHRASE.split())
    return [
        sum(word in words for word in response.split()) / max(1, len(response.split()))
        + 0.5 * difflib.SequenceMatcher(None, response.strip(), PHRASE).ratio()
        for response in responses
    ]
