"""The review page's HTTP API against a real Redis, served by uvicorn on a loopback port."""

from __future__ import annotations

import math

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from services.common.review_store import ReviewStore
from services.trainer.review import ReviewMetrics, canary_columns, create_app, serve_page
from tests.conftest import free_port

SAMPLES = [
    {
        "rollout_id": "r-1",
        "prompt": "Say hi.",
        "response": "Hi there!",
        "reward": 0.5,
        "kl": 0.25,
        "version": 1,
        "time": 1.0,
    },
    {
        "rollout_id": "r-2",
        "prompt": "Be nasty.",
        "response": "<script>alert('x')</script> & done",
        "reward": -1.0,
        "kl": 1.5,
        "version": 2,
        "time": 2.0,
    },
]


@pytest.fixture
def page(redis_url):
    """(base URL, store, registry) of a review page served over real HTTP, with SAMPLES stored."""
    store = ReviewStore.from_url(redis_url, "review")
    store.record_samples(SAMPLES)
    registry = CollectorRegistry()
    server = serve_page(create_app(store, ReviewMetrics(registry), "review"), "127.0.0.1", free_port())
    yield server.url, store, registry
    server.stop()
    assert not server.thread.is_alive()


def metric(registry: CollectorRegistry, name: str, labels: str = "") -> float:
    """One sample's value from the registry's text exposition (what Prometheus scrapes)."""
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not exported")


def test_samples_are_listed_newest_first_and_count_is_validated(page):
    url, _, _ = page
    assert httpx.get(url + "healthz").json() == {"ok": True}
    listed = httpx.get(url + "api/samples").json()
    assert [s["rollout_id"] for s in listed] == ["r-2", "r-1"]  # record_samples prepends: last of a step first
    assert httpx.get(url + "api/samples", params={"count": 1}).json() == listed[:1]
    refused = httpx.get(url + "api/samples", params={"count": 0})
    assert refused.status_code == 422 and "count" in refused.text


def test_a_rating_is_stored_and_exported(page):
    url, store, registry = page
    assert metric(registry, "belay_review_ratings_total", '{rating="4"}') == 0.0  # pre-created
    assert math.isnan(metric(registry, "belay_review_rating_mean"))
    reply = httpx.post(url + "api/ratings", json={"rollout_id": "r-1", "rating": 4})
    assert reply.status_code == 201
    assert reply.json()["rating"] == 4 and reply.json()["response"] == "Hi there!"
    httpx.post(url + "api/ratings", json={"rollout_id": "r-2", "rating": 1}).raise_for_status()
    assert [(r["rollout_id"], r["rating"]) for r in store.ratings()] == [("r-1", 4), ("r-2", 1)]
    assert [r["rollout_id"] for r in httpx.get(url + "api/ratings").json()] == ["r-1", "r-2"]
    assert metric(registry, "belay_review_ratings_total", '{rating="4"}') == 1.0
    assert metric(registry, "belay_review_ratings_total", '{rating="1"}') == 1.0
    assert metric(registry, "belay_review_rating_mean") == pytest.approx((4 + 1) / 2)


def test_the_mean_is_recomputed_from_redis_at_start(redis_url):
    store = ReviewStore.from_url(redis_url, "review")
    store.record_samples(SAMPLES)
    store.record_rating("r-1", 5)
    store.record_rating("r-2", 2)
    registry = CollectorRegistry()
    create_app(store, ReviewMetrics(registry), "review")  # a restarted trainer
    assert metric(registry, "belay_review_rating_mean") == pytest.approx(3.5)


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"rollout_id": "r-1", "rating": 6}, 422, "rating must be an integer from 1 to 5"),
        ({"rollout_id": "r-1", "rating": "4"}, 422, "rating"),
        ({"rollout_id": "nope", "rating": 3}, 404, "no recent sample has rollout_id 'nope'"),
    ],
)
def test_a_bad_rating_or_unknown_sample_is_refused_with_what_was_wrong(page, body, status, words):
    url, store, registry = page
    reply = httpx.post(url + "api/ratings", json=body)
    assert reply.status_code == status and words in reply.text
    assert store.ratings() == []
    assert metric(registry, "belay_review_ratings_total", '{rating="3"}') == 0.0


def test_the_page_escapes_model_output(page):
    url, _, _ = page
    text = httpx.get(url).text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; done" in text
    assert "<script>alert(" not in text
    assert 'data-rollout-id="r-1"' in text and text.count('class="rate"') == 2 * 5


def test_canaries_are_shown_side_by_side_with_their_drift(page):
    url, store, _ = page
    prompts = ["Name a colour.", "Count to <3>."]
    for version in range(9):
        store.record_canaries(
            version,
            {
                "time": float(version),
                "prompts": prompts,
                "drift": version / 10,
                "outputs": [f"blue {version}", f"one two {version}"],
            },
        )
    listed = httpx.get(url + "api/canaries").json()
    assert [c["version"] for c in listed] == list(range(9))
    text = httpx.get(url).text
    shown = canary_columns(list(range(9)))
    assert shown[0] == 0 and shown[-1] == 8 and len(shown) == 6
    for version in shown:
        assert f"<th>v{version}</th>" in text and f"blue {version}" in text and f"<td>{version / 10:.3f}</td>" in text
    assert "Count to &lt;3&gt;." in text
    assert [v for v in range(9) if f"<th>v{v}</th>" in text] == shown  # capped at 6 columns


def test_canary_columns_keep_first_latest_and_spread_between():
    assert canary_columns([3, 1, 2]) == [1, 2, 3]
    assert canary_columns(list(range(11)), cap=6) == [0, 2, 4, 6, 8, 10]  # i·(n−1)/(cap−1) = 2i


def test_redis_down_answers_503_with_a_message(redis_url):
    store = ReviewStore(redis.Redis.from_url(redis_url), "review")
    server = serve_page(create_app(store, ReviewMetrics(CollectorRegistry()), "review"), "127.0.0.1", free_port())
    try:
        store.redis.shutdown(nosave=True)
    except redis.ConnectionError:  # the server closes the connection as it exits
        pass
    try:
        for path in ("api/samples", ""):
            reply = httpx.get(server.url + path)
            assert reply.status_code == 503 and "Redis is not answering" in reply.text
        assert httpx.get(server.url + "healthz").status_code == 200
    finally:
        server.stop()


def test_port_zero_and_a_taken_port_are_refused_with_the_reason(redis_url):
    app = create_app(ReviewStore.from_url(redis_url, "review"), ReviewMetrics(CollectorRegistry()), "review")
    with pytest.raises(ValueError, match="review_port 0 means"):
        serve_page(app, "127.0.0.1", 0)
    first = serve_page(app, "127.0.0.1", free_port())
    try:
        port = int(first.url.rsplit(":", 1)[1].strip("/"))
        with pytest.raises(RuntimeError, match=f"could not listen on 127.0.0.1:{port}"):
            serve_page(app, "127.0.0.1", port)
    finally:
        first.stop()


def test_each_canary_answer_shows_its_signals_and_a_degenerate_one_is_marked(page):
    url, store, _ = page
    signals = {
        "repeated_ngram_share": 0.74,
        "longest_repeated_span": 27,
        "compression_ratio": 3.28,
        "length_ratio": 2.0,
        "relevance": 0.2,
        "relevance_change": -0.39,
        "degenerate": True,
    }
    store.record_canaries(
        0, {"prompts": ["Day?"], "outputs": ["sorry sorry sorry"], "drift": 0.0, "signals": [signals]}
    )
    text = httpx.get(url).text
    assert '<td class="degenerate">sorry sorry sorry<div class="signals"><b>DEGENERATE</b> · ' in text
    assert "repeated 3-grams 0.74 · longest repeat 27 words · compression 3.28 · length ×2.00 of v0" in text
    assert "relevance 0.20 (-0.39)" in text
    # An empty answer's ratios are NaN: stored as null, so the JSON API (strict: no NaN) still answers.
    empty = {**signals, "compression_ratio": float("nan"), "length_ratio": float("nan"), "degenerate": False}
    store.record_canaries(1, {"prompts": ["Day?"], "outputs": [""], "drift": 1.0, "signals": [empty]})
    listed = httpx.get(url + "api/canaries").json()
    assert listed[1]["signals"][0]["compression_ratio"] is None and listed[1]["signals"][0]["length_ratio"] is None
    assert "compression  · length ×" in httpx.get(url).text
