"""The rollout queue on Redis Streams, and the keys that announce policy versions.

Keys for run R:
  belay:R:rollouts          stream of Rollout entries (producers: policy replicas)
  belay:R:rollouts:dropped  rollouts the trainer refused (stale, malformed), with the reason
  belay:R:policy_version    JSON {"version": N, "path": ..., "transport": ...}: the newest published policy
  belay:R:awaiting_persist  rollouts trained into published versions but not yet persisted (still pending)
  belay:R:replicas          hash replica -> JSON {"version", "address", "transport", "time"}: what each serves
  belay:R:versions          pub/sub channel: a hint that a new version exists (at-most-once)
  belay:R:steps             stream of trainer step summaries (what `belay up` shows)
  belay:R:data_position     JSON {"epoch", "index", "rows", "seed", ..., "finished"}: where the actor's next
                            batch starts in its dataset, set in the transaction that adds a batch
Delivery is at-least-once: the trainer XACKs only after the persisted checkpoint that used a rollout.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import redis

from .step_records import TrainerRecord, record_from_json

GROUP = "trainers"
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)  # Redis restarting: wait and retry, never crash
FINISH_REASONS = ("eos", "length")


class MalformedRollout(ValueError):
    """A stream entry that is not a valid Rollout; the message says which field is wrong."""


@dataclass
class Rollout:
    """One sampled response and everything the trainer needs to learn from it."""

    prompt_text: str
    response_text: str
    prompt_ids: np.ndarray  # (P,) int32, templated prompt
    response_ids: np.ndarray  # (R,) int32, EOS included when emitted
    logprobs: np.ndarray  # (R,) float32, behaviour log-probs under policy_version
    ref_logprobs: np.ndarray  # (R,) float32, frozen reference log-probs
    reward: float  # raw score from the reward service
    policy_version: int
    finish_reason: str  # "eos" or "length"
    group_id: str  # shared by the samples of one prompt
    reward_model_id: str = ""
    group_size: int = 1  # samples of this prompt in the batch that produced it
    reward_components: dict = field(default_factory=dict)  # a combined reward's parts: name -> raw score
    ref_top_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # (R*K,) for the exact KL
    ref_top_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (R*K,)
    timings: dict = field(default_factory=dict)  # the batch's seconds per stage (generate, logprobs, reference,
    # reward, swap), wall-clock marks (started_at, enqueued_at) and wire bytes; the trainer adds queue
    metadata: dict = field(default_factory=dict)  # the prompt row's carried columns (data.metadata_columns)
    rollout_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)

    @property
    def top_k(self) -> int:
        """K of the reference's top-k rows (0 when the rollout carries none)."""
        return len(self.ref_top_ids) // len(self.response_ids) if len(self.response_ids) else 0

    def validate(self) -> Rollout:
        n = len(self.response_ids)
        if len(self.prompt_ids) == 0 or n == 0:
            raise MalformedRollout(f"rollout {self.rollout_id}: empty prompt_ids or response_ids")
        if len(self.logprobs) != n or len(self.ref_logprobs) != n:
            raise MalformedRollout(
                f"rollout {self.rollout_id}: {n} response tokens but {len(self.logprobs)} "
                f"logprobs and {len(self.ref_logprobs)} ref_logprobs"
            )
        if not (
            np.isfinite(self.logprobs).all() and np.isfinite(self.ref_logprobs).all() and math.isfinite(self.reward)
        ):
            raise MalformedRollout(f"rollout {self.rollout_id}: non-finite logprobs, ref_logprobs or reward")
        if not all(math.isfinite(score) for score in self.reward_components.values()):
            raise MalformedRollout(f"rollout {self.rollout_id}: non-finite reward_components {self.reward_components}")
        if len(self.ref_top_ids) != len(self.ref_top_logprobs) or len(self.ref_top_ids) % n:
            raise MalformedRollout(
                f"rollout {self.rollout_id}: {len(self.ref_top_ids)} top ids and "
                f"{len(self.ref_top_logprobs)} top logprobs for {n} response tokens"
            )
        if self.group_size < 1:
            raise MalformedRollout(f"rollout {self.rollout_id}: group_size {self.group_size} < 1")
        if self.finish_reason not in FINISH_REASONS:
            raise MalformedRollout(
                f"rollout {self.rollout_id}: finish_reason {self.finish_reason!r} is not one of {FINISH_REASONS}"
            )
        return self

    def to_fields(self) -> dict[str, bytes | str]:
        self.validate()
        return {
            "rollout_id": self.rollout_id,
            "group_id": self.group_id,
            "prompt_text": self.prompt_text,
            "response_text": self.response_text,
            "prompt_ids": np.asarray(self.prompt_ids, "<i4").tobytes(),
            "response_ids": np.asarray(self.response_ids, "<i4").tobytes(),
            "logprobs": np.asarray(self.logprobs, "<f4").tobytes(),
            "ref_logprobs": np.asarray(self.ref_logprobs, "<f4").tobytes(),
            "reward": repr(float(self.reward)),
            "policy_version": str(int(self.policy_version)),
            "finish_reason": self.finish_reason,
            "reward_model_id": self.reward_model_id,
            "group_size": str(int(self.group_size)),
            "reward_components": json.dumps(self.reward_components, allow_nan=False),
            "ref_top_ids": np.asarray(self.ref_top_ids, "<i4").tobytes(),
            "ref_top_logprobs": np.asarray(self.ref_top_logprobs, "<f4").tobytes(),
            "timings": json.dumps(self.timings, allow_nan=False),
            "metadata": json.dumps(self.metadata, allow_nan=False),
            "created_at": repr(self.created_at),
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Rollout:
        try:
            get = {k.decode(): v for k, v in fields.items()}
            text = lambda name: get[name].decode()  # noqa: E731
            return cls(
                rollout_id=text("rollout_id"),
                group_id=text("group_id"),
                prompt_text=text("prompt_text"),
                response_text=text("response_text"),
                prompt_ids=np.frombuffer(get["prompt_ids"], "<i4"),
                response_ids=np.frombuffer(get["response_ids"], "<i4"),
                logprobs=np.frombuffer(get["logprobs"], "<f4"),
                ref_logprobs=np.frombuffer(get["ref_logprobs"], "<f4"),
                reward=float(text("reward")),
                policy_version=int(text("policy_version")),
                finish_reason=text("finish_reason"),
                reward_model_id=text("reward_model_id"),
                group_size=int(text("group_size")) if "group_size" in get else 1,
                reward_components=json.loads(text("reward_components")) if "reward_components" in get else {},
                ref_top_ids=np.frombuffer(get.get("ref_top_ids", b""), "<i4"),
                ref_top_logprobs=np.frombuffer(get.get("ref_top_logprobs", b""), "<f4"),
                timings=json.loads(text("timings")),
                metadata=json.loads(text("metadata")) if "metadata" in get else {},  # older rollouts have none
                created_at=float(text("created_at")),
            ).validate()
        except MalformedRollout:
            raise
        except (KeyError, ValueError, UnicodeDecodeError) as error:
            raise MalformedRollout(f"stream entry is not a Rollout: {type(error).__name__}: {error}") from None


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RolloutQueue:
    def __init__(self, client: redis.Redis, run_name: str):
        self.redis = client
        self.stream = f"belay:{run_name}:rollouts"
        self.dropped_stream = f"belay:{run_name}:rollouts:dropped"
        self.version_key = f"belay:{run_name}:policy_version"
        self.version_channel = f"belay:{run_name}:versions"
        self.steps_stream = f"belay:{run_name}:steps"
        self.awaiting_key = f"belay:{run_name}:awaiting_persist"
        self.replicas_key = f"belay:{run_name}:replicas"
        self.data_position_key = f"belay:{run_name}:data_position"

    @classmethod
    def from_url(cls, url: str, run_name: str) -> RolloutQueue:
        return cls(redis.Redis.from_url(url), run_name)

    # --- producer side -------------------------------------------------------------------
    def add(self, rollout: Rollout) -> str:
        return self.add_all([rollout])[0]

    def add_all(self, rollouts: list[Rollout], data_position: dict | None = None) -> list[str]:
        """XADD a batch in one MULTI/EXEC: all of it is in the stream, or none (a Redis failure
        mid-batch never leaves half a group behind). With `data_position`, the actor's place in its
        dataset after this batch is set in the same transaction: the batch is in the stream exactly
        when the position has moved past its rows."""
        with self.redis.pipeline(transaction=True) as pipe:
            for rollout in rollouts:
                pipe.xadd(self.stream, rollout.to_fields())
            if data_position is not None:
                pipe.set(self.data_position_key, json.dumps(data_position))
            replies = pipe.execute()
        return [entry_id.decode() for entry_id in replies[: len(rollouts)]]

    def data_position(self) -> dict | None:
        """The actor's saved place in its dataset (None before its first batch)."""
        raw = self.redis.get(self.data_position_key)
        return json.loads(raw) if raw else None

    def data_finished(self) -> bool:
        """Whether the actor has used up its data (data.epochs): no rollout will follow those in the stream."""
        return bool((self.data_position() or {}).get("finished"))

    def waiting(self) -> int:
        """Rollouts no trainer has read yet (the group's lag); all of them if no group exists yet."""
        try:
            for group in self.redis.xinfo_groups(self.stream):
                if group["name"].decode() == GROUP and group.get("lag") is not None:
                    return int(group["lag"])
        except redis.ResponseError:  # no stream yet
            return 0
        return int(self.redis.xlen(self.stream))

    # --- consumer side -------------------------------------------------------------------
    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def read(
        self, consumer: str, count: int, block_ms: int, pending: bool = False, after: str = "0"
    ) -> list[tuple[str, Rollout | MalformedRollout]]:
        """Entries for this consumer: its own pending ones with ids above `after` (pending=True),
        or new ones (blocking up to block_ms)."""
        reply = self.redis.xreadgroup(
            GROUP, consumer, {self.stream: after if pending else ">"}, count=count, block=None if pending else block_ms
        )
        entries = []
        for _, messages in reply or []:
            for entry_id, fields in messages:
                if not fields:  # a pending entry deleted from the stream: nothing left to deliver
                    self.ack([entry_id.decode()])
                    continue
                try:
                    entries.append((entry_id.decode(), Rollout.from_fields(fields)))
                except MalformedRollout as error:
                    entries.append((entry_id.decode(), error))
        return entries

    def claim_abandoned(
        self, consumer: str, min_idle_ms: int, count: int
    ) -> list[tuple[str, Rollout | MalformedRollout]]:
        """Take over entries another consumer read but left unacknowledged for min_idle_ms (a trainer
        that died: a restarted one has a new name). Our own pending entries are never claimed: they
        include rollouts trained and awaiting their persist, idle for as long as the persist takes."""
        abandoned = [
            p["message_id"]
            for p in self.redis.xpending_range(self.stream, GROUP, "-", "+", count=100_000, idle=min_idle_ms)
            if p["consumer"].decode() != consumer
        ][:count]
        if not abandoned:
            return []
        entries = []
        for entry_id, fields in self.redis.xclaim(self.stream, GROUP, consumer, min_idle_ms, abandoned):
            if not fields:  # deleted from the stream meanwhile: nothing left to deliver
                self.ack([entry_id.decode()])
                continue
            try:
                entries.append((entry_id.decode(), Rollout.from_fields(fields)))
            except MalformedRollout as error:
                entries.append((entry_id.decode(), error))
        return entries

    def ack(self, entry_ids: list[str]) -> int:
        return int(self.redis.xack(self.stream, GROUP, *entry_ids)) if entry_ids else 0

    def drop(self, entry_id: str, reason: str, detail: str = "") -> None:
        """Copy an entry to the dropped stream with its reason, then ack it: refused, never lost."""
        fields = self.redis.xrange(self.stream, entry_id, entry_id)
        record = dict(fields[0][1]) if fields else {}
        record.update(
            {b"drop_reason": reason.encode(), b"drop_detail": detail.encode(), b"source_entry": entry_id.encode()}
        )
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dropped_stream, record)
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.execute()

    def pending_count(self) -> int:
        try:
            return int(self.redis.xpending(self.stream, GROUP)["pending"])
        except redis.ResponseError:
            return 0

    # --- versions and step log -----------------------------------------------------------
    def publish_version(self, version: int, path: str, transport: str = "file", awaiting: int | None = None) -> None:
        """Announce a published version; with `awaiting`, the count of trained-but-unpersisted
        rollouts changes in the same transaction, so the actor never sees one without the other."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.version_key, json.dumps({"version": version, "path": path, "transport": transport}))
            if awaiting is not None:
                pipe.set(self.awaiting_key, int(awaiting))
            pipe.publish(self.version_channel, str(version))
            pipe.execute()

    def ack_persisted(self, entry_ids: list[str], awaiting: int) -> None:
        """XACK rollouts a committed checkpoint holds, and lower the awaiting count with them."""
        with self.redis.pipeline(transaction=True) as pipe:
            if entry_ids:
                pipe.xack(self.stream, GROUP, *entry_ids)
            pipe.set(self.awaiting_key, int(awaiting))
            pipe.execute()

    def awaiting_persist(self) -> int:
        return int(self.redis.get(self.awaiting_key) or 0)

    def latest_version(self) -> tuple[int, str | None]:
        record = self.latest_publication()
        return int(record.get("version", 0)), record.get("path")

    def latest_publication(self) -> dict:
        """{"version", "path", "transport"} of the newest published version ({} before the first)."""
        raw = self.redis.get(self.version_key)
        return json.loads(raw) if raw else {}

    def report_serving(self, replica: str, version: int, address: str, transport: str) -> None:
        self.redis.hset(
            self.replicas_key,
            replica,
            json.dumps({"version": version, "address": address, "transport": transport, "time": time.time()}),
        )

    def replicas(self, max_age_seconds: float | None = None) -> dict[str, dict]:
        """What each policy replica last said it serves; with max_age_seconds, only recent reports."""
        now, found = time.time(), {}
        for replica, raw in self.redis.hgetall(self.replicas_key).items():
            record = json.loads(raw)
            if max_age_seconds is None or now - record["time"] <= max_age_seconds:
                found[replica.decode()] = record
        return found

    def log_step(self, record: TrainerRecord) -> None:
        """The trainer's record of a step (or a rollback), as strict JSON, on the steps stream."""
        self.redis.xadd(self.steps_stream, {"json": record.to_json()}, maxlen=100_000, approximate=True)

    def read_steps(self, after: str = "0-0", block_ms: int | None = None) -> list[tuple[str, TrainerRecord]]:
        """The trainer's records after stream entry `after`, oldest first, with their entry ids."""
        reply = self.redis.xread({self.steps_stream: after}, block=block_ms)
        return [
            (entry_id.decode(), record_from_json(fields[b"json"]))
            for _, messages in reply or []
            for entry_id, fields in messages
        ]
