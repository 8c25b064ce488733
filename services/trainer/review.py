"""The review page the trainer serves over HTTP: recent samples with their reward, KL and prompt
metadata (a dataset's carried columns, e.g. the ground-truth answer), the
canary prompts' outputs side by side across versions, and a 1..5 rating a person gives a sample
(the seed's human spot-check), stored in Redis and exported as metrics.

Everything shown is model output, so every value is escaped (html.escape) and the page loads no
external asset: it works offline and injects nothing a model wrote."""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import threading
import time

import fastapi
import redis
import uvicorn
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, Field

from ..common.review_store import MAX_SAMPLES, RATINGS, ReviewStore

log = logging.getLogger(__name__)
PAGE_SAMPLES = 50
CANARY_COLUMNS = 6  # first version, a few in between, latest: more columns stop being readable


class ReviewMetrics:
    """belay_review_ratings_total{rating} counts ratings given (through this process); the mean is
    recomputed from every rating stored in Redis, so it stays right across trainer restarts."""

    def __init__(self, registry: CollectorRegistry):
        self.ratings = Counter(
            "belay_review_ratings",
            "Ratings given on the review page, by rating (1: broken, 5: fine)",
            ["rating"],
            registry=registry,
        )
        for rating in RATINGS:  # every series exists from the start, so rate() sees the first rating
            self.ratings.labels(rating=str(rating))
        self.mean = Gauge("belay_review_rating_mean", "Mean of all stored ratings (NaN: none yet)", registry=registry)
        self.mean.set(math.nan)

    def refresh_mean(self, store: ReviewStore) -> None:
        ratings = [r["rating"] for r in store.ratings()]
        self.mean.set(sum(ratings) / len(ratings) if ratings else math.nan)


class RatingRequest(BaseModel):
    rollout_id: str = Field(min_length=1)
    rating: int = Field(strict=True)  # "4" or 4.5 is refused rather than guessed at


def canary_columns(versions: list[int], cap: int = CANARY_COLUMNS) -> list[int]:
    """At most `cap` versions, evenly spread, always the first and the latest."""
    versions = sorted(versions)
    if len(versions) <= cap:
        return versions
    picks = {round(i * (len(versions) - 1) / (cap - 1)) for i in range(cap)}
    return [versions[i] for i in sorted(picks)]


def create_app(store: ReviewStore, metrics: ReviewMetrics, run_name: str) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title=f"Belay review: {run_name}", docs_url=None, redoc_url=None, openapi_url=None)
    try:
        metrics.refresh_mean(store)
    except redis.RedisError as error:  # Redis may come up after the trainer; the next rating refreshes it
        log.warning("review page: could not read the stored ratings yet (%s)", error)

    @app.exception_handler(redis.RedisError)
    def redis_down(request: fastapi.Request, error: redis.RedisError):
        message = f"Redis is not answering, so the review data cannot be read or stored: {error}"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": message}, status_code=503)
        return PlainTextResponse(message, status_code=503)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/api/samples")
    def samples(count: int = fastapi.Query(PAGE_SAMPLES, ge=1, le=MAX_SAMPLES)) -> list[dict]:
        return store.recent_samples(count)

    @app.get("/api/canaries")
    def canaries() -> list[dict]:
        return list(store.canaries().values())

    @app.get("/api/ratings")
    def ratings() -> list[dict]:
        return store.ratings()

    @app.post("/api/ratings", status_code=201)
    def rate(request: RatingRequest) -> dict:
        try:
            record = store.record_rating(request.rollout_id, request.rating)
        except ValueError as error:
            # record_rating checks the rating first: with a valid rating, the sample was unknown
            raise fastapi.HTTPException(404 if request.rating in RATINGS else 422, str(error)) from None
        metrics.ratings.labels(rating=str(record["rating"])).inc()
        metrics.refresh_mean(store)
        return record

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        rated = {r["rollout_id"]: r["rating"] for r in store.ratings()}
        return render_page(run_name, store.recent_samples(PAGE_SAMPLES), store.canaries(), rated)

    return app


def render_page(run_name: str, samples: list[dict], canaries: dict[int, dict], rated: dict[str, int]) -> str:
    e = html.escape
    rows = []
    for sample in samples:
        rollout_id = str(sample["rollout_id"])
        buttons = "".join(f'<button class="rate" data-rating="{r}">{r}</button>' for r in RATINGS)
        status = f"rated {rated[rollout_id]}" if rollout_id in rated else ""
        rows.append(
            f'<tr class="sample" data-rollout-id="{e(rollout_id)}"><td>{e(str(sample.get("version", "")))}</td>'
            f'<td class="prompt">{e(str(sample.get("prompt", "")))}</td>'
            f'<td class="response">{e(str(sample.get("response", "")))}</td>'
            f'<td class="metadata">{e(metadata_text(sample.get("metadata")))}</td>'
            f"<td>{formatted(sample.get('reward'), '+.3f')}</td><td>{formatted(sample.get('kl'), '.3f')}</td>"
            f'<td>{buttons} <span class="status">{status}</span></td></tr>'
        )
    samples_html = (
        "<table><tr><th>version</th><th>prompt</th><th>response</th><th>metadata</th><th>reward</th><th>KL</th>"
        "<th>rating (1: broken, 5: fine)</th></tr>" + "".join(rows) + "</table>"
        if rows
        else "<p>No samples yet: the trainer writes them after each step.</p>"
    )
    return PAGE.format(
        run=e(run_name), samples=samples_html, canaries=render_canaries(canaries), rated=len(rated), script=SCRIPT
    )


def render_canaries(canaries: dict[int, dict]) -> str:
    """One row per canary prompt, one column per chosen version, and the drift of each version."""
    if not canaries:
        return "<p>No canary outputs yet: the policy writes them for each version it serves.</p>"
    e = html.escape
    versions = canary_columns(list(canaries))
    outputs = {v: dict(zip(canaries[v].get("prompts", []), canaries[v].get("outputs", []))) for v in versions}
    prompts = list(dict.fromkeys(p for v in versions for p in canaries[v].get("prompts", [])))
    header = "<tr><th>prompt</th>" + "".join(f"<th>v{v}</th>" for v in versions) + "</tr>"
    drift = (
        '<tr class="drift"><th>drift</th>'
        + "".join(f"<td>{formatted(canaries[v].get('drift'), '.3f')}</td>" for v in versions)
        + "</tr>"
    )
    signals = {v: dict(zip(canaries[v].get("prompts", []), canaries[v].get("signals", []))) for v in versions}
    rows = [
        '<tr class="canary"><td class="prompt">'
        + e(prompt)
        + "</td>"
        + "".join(answer_cell(outputs[v].get(prompt, ""), signals[v].get(prompt)) for v in versions)
        + "</tr>"
        for prompt in prompts
    ]
    return "<table>" + header + "".join(rows) + drift + "</table>"


def answer_cell(text: str, signals: dict | None) -> str:
    """A canary answer with its degeneration signals under it; a degenerate one marked."""
    if signals is None:  # a record written before the policy measured them
        return f"<td>{html.escape(str(text))}</td>"
    line = (
        f"repeated 3-grams {formatted(signals['repeated_ngram_share'], '.2f')} · longest repeat "
        f"{signals['longest_repeated_span']} words · compression {formatted(signals['compression_ratio'], '.2f')} · "
        f"length ×{formatted(signals['length_ratio'], '.2f')} of v0 · "
        f"relevance {formatted(signals['relevance'], '.2f')} ({formatted(signals['relevance_change'], '+.2f')})"
    )
    mark = ' class="degenerate"' if signals["degenerate"] else ""
    verdict = "<b>DEGENERATE</b> · " if signals["degenerate"] else ""
    return f'<td{mark}>{html.escape(str(text))}<div class="signals">{verdict}{line}</div></td>'


def metadata_text(metadata) -> str:
    """A sample's metadata, one `name: JSON value` per line ("" for none), unescaped: the caller escapes it."""
    if not metadata:
        return ""
    return "\n".join(f"{name}: {json.dumps(value, ensure_ascii=False)}" for name, value in metadata.items())


def formatted(value, spec: str) -> str:
    """A figure for the page; blank when there is none (a NaN is stored as null)."""
    return format(value, spec) if isinstance(value, (int, float)) else ""


SCRIPT = """
for (const button of document.querySelectorAll("button.rate")) {
  button.addEventListener("click", async () => {
    const row = button.closest("tr"), status = row.querySelector(".status");
    status.textContent = "saving...";
    try {
      const reply = await fetch("api/ratings", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({rollout_id: row.dataset.rolloutId, rating: Number(button.dataset.rating)})});
      const body = await reply.json();
      status.textContent = reply.ok ? "rated " + body.rating : "not stored: " + JSON.stringify(body.detail);
    } catch (error) {
      status.textContent = "not stored: " + error;
    }
  });
}
"""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Belay review: {run}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.5em; vertical-align: top; text-align: left; }}
td.response, td.prompt, td.metadata {{ white-space: pre-wrap; max-width: 40em; }}
.status {{ font-weight: bold; }}
</style></head>
<body>
<h1>Belay review: run {run}</h1>
<p>{rated} samples rated. Ratings are stored in Redis and exported as belay_review_ratings_total and
belay_review_rating_mean on the trainer's /metrics.</p>
<h2>Canary prompts across versions</h2>
{canaries}
<h2>Recent samples</h2>
{samples}
<script>{script}</script>
</body></html>
"""


@dataclasses.dataclass
class ReviewServer:
    """The review page running in a daemon thread of the trainer."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def run_until_stopped(server: uvicorn.Server) -> None:
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind; it has logged why, and serve_page() raises
        pass


def serve_page(app: fastapi.FastAPI, host: str, port: int, startup_timeout: float = 30.0) -> ReviewServer:
    """Run the app under uvicorn in a daemon thread; returns once it listens (or raises)."""
    if not 0 < port <= 65535:
        raise ValueError(f"review page port must be 1..65535, got {port} (trainer.review_port 0 means: no page)")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=run_until_stopped, args=(server,), name="review-page", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:  # uvicorn logs why (e.g. port in use)
            server.should_exit = True
            raise RuntimeError(
                f"the review page could not listen on {host}:{port}; is the port in use? "
                "(set trainer.review_port, 0 for no page)"
            )
        time.sleep(0.05)
    return ReviewServer(server, thread, f"http://{host}:{port}/")
