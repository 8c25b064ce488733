"""Rollout serialisation and the Redis Streams rollout queue (services/common/rollout_queue.py),
against a real redis-server."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import redis

from services.common.rollout_queue import GROUP, MalformedRollout, Rollout, RolloutQueue, consumer_name
from services.common.step_records import RollbackRecord, StepRecord
from tests.step_records import make_step_record
from tests.strict_json import strict_loads


def make_rollout(**overrides) -> Rollout:
    values = dict(
        prompt_text="<|im_start|>user\nHow are you?<|im_end|>\n",
        response_text="Great, thank you ✓",
        prompt_ids=np.array([1, 40, 41, 42, 2], dtype=np.int32),
        response_ids=np.array([77, 78, 2], dtype=np.int32),
        logprobs=np.array([-0.5, -1.25, -0.125], dtype=np.float32),
        ref_logprobs=np.array([-0.75, -1.0, -0.25], dtype=np.float32),
        reward=0.8125,
        policy_version=3,
        finish_reason="eos",
        group_id="group-7",
        reward_model_id="vader",
        timings={"generate": 0.5, "reference": 0.25},
        metadata={"answer": "42", "tests": [{"input": "2 3", "output": "5"}], "level": 3, "note": None},
    )
    values.update(overrides)
    return Rollout(**values)


def assert_same_rollout(a: Rollout, b: Rollout) -> None:
    for name in [
        "prompt_text",
        "response_text",
        "reward",
        "policy_version",
        "finish_reason",
        "group_id",
        "reward_model_id",
        "timings",
        "metadata",
        "rollout_id",
        "created_at",
    ]:
        assert getattr(a, name) == getattr(b, name), name
    for name in ["prompt_ids", "response_ids", "logprobs", "ref_logprobs"]:
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name


def as_redis_fields(fields: dict) -> dict[bytes, bytes]:
    """What redis-py hands back for a hash of str/bytes values."""
    return {k.encode(): (v if isinstance(v, bytes) else v.encode()) for k, v in fields.items()}


@pytest.fixture
def client(redis_url):
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def queue(client) -> RolloutQueue:
    return RolloutQueue(client, "test")


# --- Rollout ----------------------------------------------------------------------------------


def test_rollout_round_trips_through_fields():
    rollout = make_rollout(reward=-1.0 / 3.0, created_at=1234.5678901234)
    back = Rollout.from_fields(as_redis_fields(rollout.to_fields()))
    assert_same_rollout(rollout, back)
    assert back.reward == -1.0 / 3.0  # repr keeps every bit of the float
    assert back.prompt_ids.dtype == np.dtype("<i4") and back.logprobs.dtype == np.dtype("<f4")


def test_rollout_ids_are_unique_by_default():
    assert make_rollout().rollout_id != make_rollout().rollout_id


@pytest.mark.parametrize(
    "field, value",
    [
        ("logprobs", np.array([-0.5, -1.0], np.float32)),
        ("ref_logprobs", np.array([-0.5, -1.0, -1.0, -2.0], np.float32)),
    ],
)
def test_validate_refuses_mismatched_lengths(field, value):
    with pytest.raises(MalformedRollout, match="3 response tokens but"):
        make_rollout(**{field: value}).validate()


@pytest.mark.parametrize(
    "overrides",
    [
        {"logprobs": np.array([-0.5, np.nan, -1.0], np.float32)},
        {"ref_logprobs": np.array([-0.5, -np.inf, -1.0], np.float32)},
        {"reward": math.inf},
        {"reward": math.nan},
        {"reward_components": {"sentiment": 0.5, "length": math.nan}},
    ],
)
def test_validate_refuses_non_finite_values(overrides):
    with pytest.raises(MalformedRollout, match="non-finite"):
        make_rollout(**overrides).validate()


def test_validate_refuses_bad_finish_reason():
    with pytest.raises(MalformedRollout, match="finish_reason 'stop'"):
        make_rollout(finish_reason="stop").validate()


@pytest.mark.parametrize(
    "overrides",
    [
        {"prompt_ids": np.array([], np.int32)},
        {
            "response_ids": np.array([], np.int32),
            "logprobs": np.array([], np.float32),
            "ref_logprobs": np.array([], np.float32),
        },
    ],
)
def test_validate_refuses_empty_prompt_or_response(overrides):
    with pytest.raises(MalformedRollout, match="empty"):
        make_rollout(**overrides).validate()


def test_validate_names_the_rollout():
    rollout = make_rollout(finish_reason="stop")
    with pytest.raises(MalformedRollout, match=rollout.rollout_id):
        rollout.validate()


def test_malformed_rollout_cannot_be_serialised():
    with pytest.raises(MalformedRollout):
        make_rollout(reward=math.nan).to_fields()


def test_from_fields_refuses_a_missing_field():
    fields = as_redis_fields(make_rollout().to_fields())
    del fields[b"ref_logprobs"]
    with pytest.raises(MalformedRollout, match="KeyError.*ref_logprobs"):
        Rollout.from_fields(fields)


@pytest.mark.parametrize(
    "field, raw",
    [
        (b"reward", b"high"),
        (b"policy_version", b"3.5"),
        (b"logprobs", b"\x00\x00\x00"),
        (b"timings", b"{not json"),
        (b"group_id", b"\xff\xfe"),
    ],
)
def test_from_fields_refuses_garbage(field, raw):
    fields = as_redis_fields(make_rollout().to_fields())
    fields[field] = raw
    with pytest.raises(MalformedRollout):
        Rollout.from_fields(fields)


def test_from_fields_validates_the_decoded_rollout():
    fields = as_redis_fields(make_rollout().to_fields())
    fields[b"finish_reason"] = b"stop"
    with pytest.raises(MalformedRollout, match="finish_reason"):
        Rollout.from_fields(fields)


def test_consumer_name_carries_the_pid():
    assert consumer_name().endswith(f":{os.getpid()}")


# --- RolloutQueue on a real redis-server ---------------------------------------------------------


def test_added_rollout_is_read_back_by_the_consumer_group(queue):
    queue.ensure_group()
    queue.ensure_group()  # idempotent
    rollout = make_rollout()
    entry_id = queue.add(rollout)
    got = queue.read("trainer-a", count=10, block_ms=50)
    assert [entry for entry, _ in got] == [entry_id]
    assert isinstance(got[0][1], Rollout)
    assert_same_rollout(rollout, got[0][1])
    assert queue.read("trainer-a", count=10, block_ms=10) == []  # nothing new


def test_group_created_after_adds_still_sees_earlier_rollouts(queue):
    ids = [queue.add(make_rollout(policy_version=v)) for v in range(3)]
    queue.ensure_group()
    got = queue.read("trainer-a", count=2, block_ms=50)
    assert [entry for entry, _ in got] == ids[:2]
    assert [r.policy_version for _, r in got] == [0, 1]


def test_unacked_entries_are_redelivered_to_the_same_consumer(queue):
    queue.ensure_group()
    first, second = queue.add(make_rollout()), queue.add(make_rollout())
    assert [e for e, _ in queue.read("trainer-a", count=10, block_ms=50)] == [first, second]
    # the trainer restarts: its pending entries come back, to it and to no one else
    again = queue.read("trainer-a", count=10, block_ms=50, pending=True)
    assert [e for e, _ in again] == [first, second]
    assert all(isinstance(r, Rollout) for _, r in again)
    assert queue.read("trainer-b", count=10, block_ms=50, pending=True) == []
    assert queue.read("trainer-b", count=10, block_ms=10) == []
    assert queue.pending_count() == 2


def test_ack_removes_entries_from_pending(queue):
    queue.ensure_group()
    first, second = queue.add(make_rollout()), queue.add(make_rollout())
    queue.read("trainer-a", count=10, block_ms=50)
    assert queue.ack([first]) == 1
    assert queue.pending_count() == 1
    assert [e for e, _ in queue.read("trainer-a", count=10, block_ms=50, pending=True)] == [second]
    assert queue.ack([second]) == 1
    assert queue.ack([second]) == 0  # already acked
    assert queue.ack([]) == 0
    assert queue.pending_count() == 0
    assert queue.read("trainer-a", count=10, block_ms=50, pending=True) == []


def test_drop_copies_the_entry_with_its_reason_and_acks_it(queue, client):
    queue.ensure_group()
    rollout = make_rollout(policy_version=1)
    entry_id = queue.add(rollout)
    queue.read("trainer-a", count=10, block_ms=50)
    queue.drop(entry_id, "stale", "version 1 is 3 behind")
    assert client.xlen(queue.dropped_stream) == 1
    assert queue.pending_count() == 0
    [(_, record)] = client.xrange(queue.dropped_stream)
    assert record[b"drop_reason"] == b"stale"
    assert record[b"drop_detail"] == b"version 1 is 3 behind"
    assert record[b"source_entry"] == entry_id.encode()
    assert_same_rollout(rollout, Rollout.from_fields(record))  # nothing lost
    assert client.xlen(queue.stream) == 1  # the original stays in the stream, only acked


def test_malformed_raw_entry_comes_back_as_malformed_rollout_and_can_be_dropped(queue, client):
    queue.ensure_group()
    good = queue.add(make_rollout())
    bad = client.xadd(queue.stream, {"rollout_id": "x", "reward": "not a number"}).decode()
    fields = as_redis_fields(make_rollout().to_fields())
    fields[b"logprobs"] = np.array([-0.5], "<f4").tobytes()  # 1 logprob for 3 tokens
    short = client.xadd(queue.stream, fields).decode()
    got = dict(queue.read("trainer-a", count=10, block_ms=50))
    assert list(got) == [good, bad, short]
    assert isinstance(got[good], Rollout)
    assert isinstance(got[bad], MalformedRollout)
    assert isinstance(got[short], MalformedRollout) and "3 response tokens but 1 logprobs" in str(got[short])
    queue.drop(bad, "malformed", str(got[bad]))
    queue.drop(short, "malformed", str(got[short]))
    assert client.xlen(queue.dropped_stream) == 2
    assert queue.pending_count() == 1
    [(_, record), _] = client.xrange(queue.dropped_stream)
    assert record[b"reward"] == b"not a number" and record[b"drop_reason"] == b"malformed"


def test_pending_entry_deleted_from_the_stream_is_skipped(queue, client):
    queue.ensure_group()
    keep, gone = queue.add(make_rollout()), queue.add(make_rollout())
    queue.read("trainer-a", count=10, block_ms=50)
    client.xdel(queue.stream, gone)
    assert [e for e, _ in queue.read("trainer-a", count=10, block_ms=50, pending=True)] == [keep]


def test_waiting_reports_the_group_lag(queue):
    assert queue.waiting() == 0  # no stream yet
    for _ in range(3):
        queue.add(make_rollout())
    assert queue.waiting() == 3  # no group yet: everything waits
    queue.ensure_group()
    assert queue.waiting() == 3
    queue.read("trainer-a", count=2, block_ms=50)
    assert queue.waiting() == 1  # read but unacked entries no longer wait
    queue.add(make_rollout())
    assert queue.waiting() == 2
    queue.read("trainer-a", count=10, block_ms=50)
    assert queue.waiting() == 0


def test_pending_count_without_a_group_is_zero(queue):
    assert queue.pending_count() == 0
    queue.add(make_rollout())
    assert queue.pending_count() == 0


def test_publish_version_round_trips_and_announces_it(queue, client):
    assert queue.latest_version() == (0, None)
    subscriber = client.pubsub()
    subscriber.subscribe(queue.version_channel)
    assert subscriber.get_message(timeout=1.0)["type"] == "subscribe"
    queue.publish_version(3, "/runs/belay/checkpoints/v000003")
    assert queue.latest_version() == (3, "/runs/belay/checkpoints/v000003")
    queue.publish_version(4, "/runs/belay/checkpoints/v000004")
    assert queue.latest_version() == (4, "/runs/belay/checkpoints/v000004")
    messages = []
    deadline = time.monotonic() + 2.0
    while len(messages) < 2 and time.monotonic() < deadline:
        message = subscriber.get_message(timeout=0.2)
        if message and message["type"] == "message":
            messages.append(message["data"])
    subscriber.close()
    assert messages == [b"3", b"4"]


def test_log_step_and_read_steps_round_trip(queue):
    assert queue.read_steps() == []
    first = make_step_record(1, time=10.0, loss=-0.25, clip_fraction=0.0, seconds={"update": 1.5})
    second = RollbackRecord(version=2, rolled_back_to=0, batch_kl=21.0, kl_coef=0.1, lr=1e-5, time=11.0)
    queue.log_step(first)
    queue.log_step(second)
    steps = queue.read_steps()
    assert [type(record) for _, record in steps] == [StepRecord, RollbackRecord]
    assert steps[0][1].stats.loss == -0.25 and steps[0][1].seconds.update == 1.5 and steps[1][1] == second
    assert math.isnan(steps[0][1].stats.entropy)  # NaN goes out as null and comes back as NaN
    assert queue.read_steps(after=steps[0][0])[0][1] == second
    assert queue.read_steps(after=steps[1][0]) == []


def test_runs_with_different_names_do_not_share_keys(client):
    a, b = RolloutQueue(client, "run-a"), RolloutQueue(client, "run-b")
    a.ensure_group()
    b.ensure_group()
    a.add(make_rollout())
    a.publish_version(2, "/a")
    assert b.read("trainer", count=10, block_ms=10) == []
    assert b.waiting() == 0
    assert b.latest_version() == (0, None)
    assert len(a.read("trainer", count=10, block_ms=50)) == 1


def test_from_url_connects_to_the_server(redis_url):
    queue = RolloutQueue.from_url(redis_url, "url-run")
    queue.ensure_group()
    entry = queue.add(make_rollout())
    assert [e for e, _ in queue.read("c", count=1, block_ms=50)] == [entry]
    assert queue.stream == "belay:url-run:rollouts"
    info = {g["name"]: g for g in queue.redis.xinfo_groups(queue.stream)}
    assert GROUP.encode() in info


def test_a_rollout_written_before_metadata_existed_reads_with_none():
    fields = as_redis_fields(make_rollout().to_fields())
    del fields[b"metadata"]
    assert Rollout.from_fields(fields).metadata == {}


def test_the_data_position_is_set_in_the_transaction_that_adds_the_batch(queue):
    queue.ensure_group()
    assert queue.data_position() is None and not queue.data_finished()
    queue.add_all([make_rollout(), make_rollout()], {"epoch": 0, "index": 2, "finished": False})
    assert queue.redis.xlen(queue.stream) == 2 and queue.data_position() == {"epoch": 0, "index": 2, "finished": False}
    with pytest.raises(MalformedRollout):  # a batch that cannot be written moves nothing
        queue.add_all([make_rollout(), make_rollout(reward=math.nan)], {"epoch": 1, "index": 0, "finished": True})
    assert queue.redis.xlen(queue.stream) == 2 and queue.data_position()["index"] == 2
    queue.add_all([make_rollout()], {"epoch": 1, "index": 0, "finished": True})
    assert queue.data_finished()
    assert [r.metadata for _, r in queue.read("c", 10, 10)] == [make_rollout().metadata] * 3


def test_the_stream_fields_are_strict_json():
    """What a rollout writes to the stream as JSON (components, timings, metadata) is JSON strict
    readers accept; a non-finite timing is refused at the writer, not written as NaN."""
    rollout = make_rollout(reward_components={"sentiment": 0.25}, timings={"generate": 0.5}, metadata={"answer": "4"})
    fields = rollout.to_fields()
    for name in ("reward_components", "timings", "metadata"):
        strict_loads(fields[name])
    with pytest.raises(ValueError):
        make_rollout(timings={"generate": math.nan}).to_fields()
