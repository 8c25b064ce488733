"""System-test fixtures: a whole-stack config on free loopback ports with tiny real models."""

from __future__ import annotations

import pathlib

import pytest

from services.common.config import BelayConfig
from services.common.ports import free_ports

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def stack_config(tmp_path, tiny_lm_dir, tiny_reward_dir) -> BelayConfig:
    ports = free_ports(9)
    return BelayConfig.model_validate(
        {
            "run": {"name": "system", "checkpoint_dir": str(tmp_path / "run" / "checkpoints")},
            "redis": {"url": f"redis://127.0.0.1:{ports[0]}/0", "max_queue_lag": 8, "block_ms": 200},
            "policy": {
                "model_dir": str(tiny_lm_dir),
                "prompts_file": str(REPO / "prompts/default.txt"),
                "address": f"127.0.0.1:{ports[1]}",
                "metrics_port": ports[5],
                "max_new_tokens": 12,
                "prompts_per_batch": 4,
                "samples_per_prompt": 2,
                "torch_threads": 1,
            },
            "reference": {
                "model_dir": str(tiny_lm_dir),
                "address": f"127.0.0.1:{ports[2]}",
                "metrics_port": ports[6],
                "torch_threads": 1,
            },
            "reward": {
                "backend": "hf_classifier",
                "model_dir": str(tiny_reward_dir),
                "address": f"127.0.0.1:{ports[3]}",
                "metrics_port": ports[7],
            },
            "trainer": {
                "model_dir": str(tiny_lm_dir),
                "metrics_port": ports[4],
                "review_port": ports[8],
                "policy_address": f"127.0.0.1:{ports[1]}",
                "batch_size": 8,
                "minibatch_size": 4,
                "ppo_epochs": 2,
                "lr": 3e-3,
                "max_steps": 3,
                "max_staleness": 1,
                "torch_threads": 1,
            },
        }
    )


def variant(config: BelayConfig, changes: dict) -> BelayConfig:
    """The config with some sections' fields changed, validated again as a whole."""
    data = config.model_dump()
    for section, values in changes.items():
        data[section].update(values)
    return BelayConfig.model_validate(data)


def account_for_rollouts(config: BelayConfig) -> dict:
    """Every rollout ever written, sorted into trained / dropped / pending / unread, from Redis and
    the latest checkpoint. Asserts each one is accounted for and none was trained twice."""
    import redis

    from services.common.checkpoints import latest_valid_checkpoint, load_trainer_state
    from services.common.rollout_queue import GROUP, RolloutQueue

    queue = RolloutQueue.from_url(config.redis.url, config.run.name)
    client = redis.Redis.from_url(config.redis.url)
    entries = {eid.decode(): fields[b"rollout_id"].decode() for eid, fields in client.xrange(queue.stream)}
    pending = {p["message_id"].decode() for p in client.xpending_range(queue.stream, GROUP, "-", "+", count=100_000)}
    group = next(g for g in client.xinfo_groups(queue.stream) if g["name"].decode() == GROUP)
    last = tuple(map(int, group["last-delivered-id"].decode().split("-")))
    unread = {eid for eid in entries if tuple(map(int, eid.split("-"))) > last}
    dropped = {}
    for _, fields in client.xrange(queue.dropped_stream):
        dropped[fields.get(b"rollout_id", fields[b"source_entry"]).decode()] = fields[b"drop_reason"].decode()
    consumed_list = load_trainer_state(latest_valid_checkpoint(config.run.checkpoint_dir)[1])[1]["consumed_rollout_ids"]
    consumed = set(consumed_list)
    assert len(consumed_list) == len(consumed), "a rollout was trained on twice"
    assert not consumed & set(dropped), "a rollout was both trained on and dropped"
    acked = set(entries) - pending - unread
    for entry_id in acked:
        assert entries[entry_id] in consumed or entries[entry_id] in dropped, f"{entry_id} acknowledged, never used"
    reasons: dict[str, int] = {}
    for reason in dropped.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "written": len(entries),
        "trained": len(consumed & set(entries.values())),
        "dropped": reasons,
        "pending": len(pending),
        "unread": len(unread),
    }
