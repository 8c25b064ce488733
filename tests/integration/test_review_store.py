"""ReviewStore on a real Redis: samples newest first and capped, canaries per version, ratings
validated and kept."""

import math

import pytest
import redis

from services.common.review_store import MAX_SAMPLES, ReviewStore
from tests.strict_json import strict_loads


def sample(i: int) -> dict:
    return {
        "rollout_id": f"r{i}",
        "prompt": f"p{i}",
        "response": f"answer {i}",
        "reward": i / 10,
        "kl": 0.1,
        "version": i // 8,
    }


def test_samples_are_newest_first_and_capped(redis_url):
    store = ReviewStore.from_url(redis_url, "t")
    for start in range(0, MAX_SAMPLES + 16, 8):
        store.record_samples([sample(i) for i in range(start, start + 8)])
    recent = store.recent_samples(MAX_SAMPLES + 50)
    assert len(recent) == MAX_SAMPLES
    assert recent[0]["rollout_id"] == f"r{MAX_SAMPLES + 15}"  # the last written
    assert [r["rollout_id"] for r in store.recent_samples(3)] == [f"r{MAX_SAMPLES + 15 - k}" for k in range(3)]


def test_ratings_are_validated_and_stored(redis_url):
    store = ReviewStore.from_url(redis_url, "t")
    store.record_samples([sample(1), sample(2)])
    record = store.record_rating("r2", 4)
    assert record["rating"] == 4 and record["response"] == "answer 2" and record["version"] == 0
    store.record_rating("r1", 1)
    store.record_rating("r2", 5)  # a second rating of one sample replaces the first
    assert {(r["rollout_id"], r["rating"]) for r in store.ratings()} == {("r1", 1), ("r2", 5)}
    for bad in (0, 6, 2.5, "3", True):
        with pytest.raises(ValueError, match="rating must be an integer from 1 to 5"):
            store.record_rating("r1", bad)
    with pytest.raises(ValueError, match="no recent sample has rollout_id 'nope'"):
        store.record_rating("nope", 3)


def test_canaries_by_version(redis_url):
    store = ReviewStore.from_url(redis_url, "t")
    assert store.first_canaries() is None
    store.record_canaries(3, {"prompts": ["a"], "outputs": ["x3"], "drift": 0.2})
    store.record_canaries(0, {"prompts": ["a"], "outputs": ["x0"], "drift": 0.0})
    assert list(store.canaries()) == [0, 3]
    assert store.first_canaries()["outputs"] == ["x0"] and store.has_canaries(3) and not store.has_canaries(1)


def test_canary_verdicts_are_kept_apart_from_the_answers(redis_url):
    store = ReviewStore.from_url(redis_url, "t")
    store.record_canaries(2, {"outputs": ["loop loop"], "degenerate": [0, 3]})
    store.record_canaries(1, {"outputs": ["fine"], "degenerate": []})
    store.record_canaries(0, {"outputs": ["unjudged"]})  # a record without a verdict has none
    assert store.canary_verdicts() == {1: [], 2: [0, 3]}
    assert store.canaries()[2]["degenerate"] == [0, 3] and store.first_canaries()["outputs"] == ["unjudged"]


def test_everything_stored_is_strict_json_with_non_finite_figures_as_null(redis_url):
    """Samples, canary records and verdicts, evaluations and ratings: a NaN (a sample's KL, an empty
    answer's ratio) is stored as null, which the review page and strict readers accept."""
    store = ReviewStore.from_url(redis_url, "t")
    store.record_samples([{**sample(1), "kl": math.nan}])
    store.record_canaries(1, {"outputs": [""], "compression_ratio": [math.nan], "degenerate": [0]})
    store.record_eval(1, {"reward_mean": 0.5, "accuracy": math.nan})
    store.record_rating("r1", 3)
    client = redis.Redis.from_url(redis_url)
    stored = [
        *client.lrange(store.samples_key, 0, -1),
        *client.hvals(store.canaries_key),
        *client.hvals(store.verdicts_key),
        *client.hvals(store.evals_key),
        *client.hvals(store.ratings_key),
    ]
    assert len(stored) == 5
    for raw in stored:
        strict_loads(raw)
    assert store.recent_samples(1)[0]["kl"] is None and store.evals()[1]["accuracy"] is None
