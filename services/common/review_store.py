"""What a person reviews, kept in Redis next to the run: recent samples (written by the trainer
after each step), canary outputs per policy version (written by the policy after each swap) and
ratings (written by the review page). JSON values: these are small, human-facing records, not
the hot path (rollouts travel as packed arrays on the rollout stream).

Keys, for run R:
- belay:R:samples   list, newest first, capped at MAX_SAMPLES: {rollout_id, prompt, response,
                    reward, kl, version, metadata, time}
- belay:R:canaries  hash version -> {version, time, prompts, outputs, output_ids, drift, signals
                    (per answer: services/policy/canaries.py), degenerate (indexes of the
                    degenerate answers), seconds}
- belay:R:canary_verdicts  hash version -> JSON list of the degenerate answers' indexes: the
                    verdicts alone, a few bytes a version, for the readers that poll every step
- belay:R:ratings   hash rollout_id -> {rollout_id, rating, prompt, response, version, time}
- belay:R:evals     hash version -> {version, time, rows, reward_mean, reward_std, accuracy (null
                    without one), kl_per_sequence, response_length, seconds}: the held-out
                    evaluation during the run (services/policy/heldout_eval.py)
"""

from __future__ import annotations

import json
import time

import redis

from .strict_json import strict_json

MAX_SAMPLES = 200
RATINGS = (1, 2, 3, 4, 5)  # 1: broken, 5: fine (the seed's human spot-check)


class ReviewStore:
    def __init__(self, client: redis.Redis, run_name: str):
        self.redis = client
        self.samples_key = f"belay:{run_name}:samples"
        self.canaries_key = f"belay:{run_name}:canaries"
        self.verdicts_key = f"belay:{run_name}:canary_verdicts"
        self.ratings_key = f"belay:{run_name}:ratings"
        self.evals_key = f"belay:{run_name}:evals"

    @classmethod
    def from_url(cls, url: str, run_name: str) -> ReviewStore:
        return cls(redis.Redis.from_url(url), run_name)

    # --- samples -------------------------------------------------------------------------
    def record_samples(self, samples: list[dict]) -> None:
        """Prepend one step's samples (each with at least rollout_id, prompt, response, reward, kl, version)."""
        if not samples:
            return
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(self.samples_key, *[strict_json(s) for s in samples])
            pipe.ltrim(self.samples_key, 0, MAX_SAMPLES - 1)
            pipe.execute()

    def recent_samples(self, count: int = 50) -> list[dict]:
        return [json.loads(raw) for raw in self.redis.lrange(self.samples_key, 0, max(0, count - 1))]

    def sample(self, rollout_id: str) -> dict | None:
        for raw in self.redis.lrange(self.samples_key, 0, -1):
            record = json.loads(raw)
            if record.get("rollout_id") == rollout_id:
                return record
        return None

    # --- canaries ------------------------------------------------------------------------
    def record_canaries(self, version: int, record: dict) -> None:
        """Non-finite figures (an empty answer's compression ratio) are stored as null: the review
        page's JSON and strict readers refuse NaN."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.canaries_key, str(version), strict_json({**record, "version": version}))
            if "degenerate" in record:
                pipe.hset(self.verdicts_key, str(version), strict_json(record["degenerate"]))
            pipe.execute()

    def canary_verdicts(self) -> dict[int, list[int]]:
        """Each judged version's degenerate answers (indexes; [] for a clean version), oldest first:
        what the trainer's canary rail and `belay up` poll every step, without the answers."""
        verdicts = {int(k): json.loads(v) for k, v in self.redis.hgetall(self.verdicts_key).items()}
        return dict(sorted(verdicts.items()))

    def canaries(self) -> dict[int, dict]:
        """Every version's canary record, oldest version first."""
        records = {int(k): json.loads(v) for k, v in self.redis.hgetall(self.canaries_key).items()}
        return dict(sorted(records.items()))

    def canaries_at(self, versions: list[int]) -> dict[int, dict]:
        """The canary records of those of `versions` that have one, oldest first: one HMGET."""
        if not versions:
            return {}
        raws = self.redis.hmget(self.canaries_key, [str(v) for v in versions])
        return {v: json.loads(raw) for v, raw in sorted(zip(versions, raws)) if raw is not None}

    def has_canaries(self, version: int) -> bool:
        return bool(self.redis.hexists(self.canaries_key, str(version)))

    def first_canaries(self) -> dict | None:
        versions = [int(k) for k in self.redis.hkeys(self.canaries_key)]  # not every record: the oldest one
        return self.canaries_at([min(versions)])[min(versions)] if versions else None

    # --- held-out evaluations -------------------------------------------------------------
    def record_eval(self, version: int, record: dict) -> None:
        self.redis.hset(self.evals_key, str(version), strict_json({**record, "version": version}))

    def evals(self) -> dict[int, dict]:
        """Every evaluated version's record, oldest version first."""
        records = {int(k): json.loads(v) for k, v in self.redis.hgetall(self.evals_key).items()}
        return dict(sorted(records.items()))

    def has_eval(self, version: int) -> bool:
        return bool(self.redis.hexists(self.evals_key, str(version)))

    # --- ratings -------------------------------------------------------------------------
    def record_rating(self, rollout_id: str, rating: int) -> dict:
        """Store a person's rating of a recent sample; ValueError names what was wrong."""
        if isinstance(rating, bool) or not isinstance(rating, int) or rating not in RATINGS:
            raise ValueError(f"rating must be an integer from {RATINGS[0]} to {RATINGS[-1]}, got {rating!r}")
        sample = self.sample(rollout_id)
        if sample is None:
            raise ValueError(f"no recent sample has rollout_id {rollout_id!r}")
        record = {
            "rollout_id": rollout_id,
            "rating": rating,
            "prompt": sample["prompt"],
            "response": sample["response"],
            "version": sample["version"],
            "time": time.time(),
        }
        self.redis.hset(self.ratings_key, rollout_id, strict_json(record))
        return record

    def ratings(self) -> list[dict]:
        return sorted((json.loads(v) for v in self.redis.hvals(self.ratings_key)), key=lambda r: r["time"])
