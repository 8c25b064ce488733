"""The greedy-degeneration signals against their formulas, worked out by hand on fixed strings,
including the two answers quoted in issue 19: the looping "after" answer must come out degenerate
and the "before" answer must not."""

import math
import pathlib
import zlib

import pytest
import yaml

from services.common.degeneration import (
    compression_ratio,
    cosine,
    is_degenerate,
    length_ratio,
    longest_repeated_span,
    repeated_ngram_share,
)
from services.policy.canaries import RUNBOOK, Bounds, answer_signals

SENTENCE = "I'm so sorry to hear about your family's loss."  # 9 words
LOOPING = " ".join([SENTENCE] * 4)  # issue 19's "after" answer to "How was your day at work?"
BEFORE = "It was a typical Monday, but I had a bit of a surprise. I had a meeting with a client ..."


def test_repeated_share_is_one_minus_distinct_over_all_word_3grams():
    # 36 words, 34 3-grams; the sentence repeats with period 9, so 9 distinct ones: 1 - 9/34.
    assert repeated_ngram_share(LOOPING) == pytest.approx(1 - 9 / 34)
    # "I had a" is the one 3-gram of the 19 in BEFORE (21 words) that occurs twice: 1 - 18/19.
    assert repeated_ngram_share(BEFORE) == pytest.approx(1 - 18 / 19)
    assert repeated_ngram_share("a b") == 0.0  # no 3-gram at all
    assert repeated_ngram_share("a b c a b c") == pytest.approx(1 - 3 / 4)


def test_longest_repeated_span_counts_words_of_the_longest_run_seen_twice_overlaps_allowed():
    # The 27 words from the start of copy 1 equal those from the start of copy 2 (which overlap).
    assert longest_repeated_span(LOOPING) == 27
    assert longest_repeated_span(BEFORE) == 3  # "I had a"
    assert longest_repeated_span("a a a") == 2  # words 1-2 and words 2-3
    assert longest_repeated_span("x y z w") == 0
    assert longest_repeated_span("") == 0
    assert longest_repeated_span("the cat sat and the cat ran") == 2


def test_compression_ratio_is_utf8_bytes_over_zlib_level_9_bytes():
    for text in (LOOPING, BEFORE, "é" * 50):
        raw = text.encode("utf-8")
        assert compression_ratio(text) == len(raw) / len(zlib.compress(raw, 9))
    assert compression_ratio(LOOPING) > 2.5 > 1.2 > compression_ratio(BEFORE)
    assert math.isnan(compression_ratio(""))


def test_length_ratio_and_cosine():
    assert length_ratio(48, 32) == 1.5
    assert math.isnan(length_ratio(5, 0))
    assert cosine([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2))
    assert cosine([3.0, 4.0], [-3.0, -4.0]) == pytest.approx(-1.0)
    assert math.isnan(cosine([0.0, 0.0], [1.0, 2.0]))


def test_the_verdict_repeats_past_the_bound_and_past_version_0_or_loses_relevance():
    bounds = (0.5, 0.25, 0.25)  # repetition, relevance drop, relevance floor
    assert is_degenerate(0.8, 0.0, 0.6, 0.0, *bounds)
    assert not is_degenerate(0.5, 0.0, 0.6, 0.0, *bounds)  # at the bound: not past it
    assert not is_degenerate(0.8, 0.8, 0.6, 0.0, *bounds)  # version 0 looped as much already
    assert is_degenerate(0.9, 0.8, 0.6, 0.0, *bounds)  # and now loops more
    assert is_degenerate(0.0, 0.0, 0.2, -0.3, *bounds)  # relevance fell 0.3 > 0.25, to 0.2 < 0.25
    assert not is_degenerate(0.0, 0.0, 0.2, -0.2, *bounds)  # low, but no lower than version 0's by much
    # the demos' on-topic "weekend" answers: fell 0.33 and 0.43 from 0.71, and still fit the question
    assert not is_degenerate(0.0, 0.0, 0.38, -0.33, *bounds)
    assert not is_degenerate(0.0, 0.0, 0.28, -0.43, *bounds)
    assert not is_degenerate(math.nan, 0.0, math.nan, math.nan, *bounds)  # NaN never fires


def test_the_quoted_answers_before_and_after():
    """Issue 19's answers to "How was your day at work?", with their relevance as all-MiniLM-L6-v2
    measures it (0.594 before, 0.200 after; tests/integration/test_canaries.py measures it live)."""
    before = {"text": BEFORE, "length": 24, "relevance": 0.594}
    after = answer_signals(LOOPING, 48, 0.200, before, Bounds())
    assert after["degenerate"] and after["repeated_ngram_share"] > Bounds().repetition
    assert after["relevance_change"] == pytest.approx(0.200 - 0.594)
    assert after["length_ratio"] == 2.0 and after["longest_repeated_span"] == 27
    itself = answer_signals(BEFORE, 24, 0.594, before, Bounds())
    assert not itself["degenerate"]
    assert itself["relevance_change"] == 0.0 and itself["length_ratio"] == 1.0
    # repetition alone condemns the looping answer, relevance alone a fluent but unrelated one
    assert answer_signals(LOOPING, 48, 0.594, before, Bounds())["degenerate"]
    assert answer_signals("Paris is the capital of France.", 8, 0.05, before, Bounds())["degenerate"]


def test_the_alert_rule_and_the_grafana_alert_carry_the_policys_runbook_line():
    root = pathlib.Path(__file__).resolve().parents[2]
    for path, key, name in (
        ("deploy/prometheus/rules/belay.yml", "alert", "BelayCanaryDegenerate"),
        ("deploy/grafana/provisioning/alerting/belay-alerts.yaml", "title", "BelayCanaryDegenerate"),
    ):
        groups = yaml.safe_load((root / path).read_text())["groups"]
        [rule] = [rule for group in groups for rule in group["rules"] if rule.get(key) == name]
        assert rule["annotations"]["runbook"] == RUNBOOK, path
    assert "## BelayCanaryDegenerate" in (root / "docs/runbooks.md").read_text()
