"""Faults injected into a running stack of real processes: kill -9 of the trainer mid-update,
mid-publish and mid-persist, the policy mid-generation, the reward service mid-request, and Redis
(AOF, appendfsync always). After recovery the policy version keeps advancing and every rollout
written is accounted for once: trained once into the resumed lineage, or dropped with a reason."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time

import pytest

from services.common.config import BelayConfig
from services.common.published import published_dir
from services.common.rollout_queue import RolloutQueue
from services.local_stack import LocalStack
from tests.system.conftest import account_for_rollouts, variant


def latest_version(queue: RolloutQueue) -> int:
    steps = queue.read_steps("0-0")
    return steps[-1][1].version if steps else 0


def wait_for_version(stack: LocalStack, queue: RolloutQueue, version: int, timeout: float) -> float:
    """Seconds until the trainer publishes `version` (fails past the timeout, or if a process dies)."""
    start = time.monotonic()
    while True:
        try:
            if latest_version(queue) >= version:
                return time.monotonic() - start
        except Exception:  # Redis restarting
            pass
        stack.check_alive()
        assert time.monotonic() - start < timeout, f"version {version} not reached in {timeout:.0f} s"
        time.sleep(0.2)


def kill_inside(stack: LocalStack, directory: pathlib.Path, timeout: float) -> str:
    """kill -9 the trainer while it writes a version into `directory` (a .tmp-v* directory exists).
    It is frozen with SIGSTOP the moment one appears; if the directory is still there while it is
    frozen, the kill lands mid-write for certain, else it resumes and the next write is tried."""
    pid = stack.processes["trainer"].popen.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = os.listdir(directory) if directory.is_dir() else []
        if any(name.startswith(".tmp-v") for name in names):
            os.kill(pid, signal.SIGSTOP)
            caught = [name for name in os.listdir(directory) if name.startswith(".tmp-v")]
            if caught:
                stack.kill("trainer")
                return caught[0]
            os.kill(pid, signal.SIGCONT)
        stack.check_alive()
        time.sleep(0.0002)  # a poll of a few hundred microseconds, not a core spinning beside the trainer
    raise AssertionError(f"the trainer wrote nothing into {directory} in {timeout:.0f} s")


# Left out for CI time (about 65 s each): the reward service's kill -9 (a reward service gone and back
# is what tests/system/test_reward_live_swap.py does mid-run, through the same retry in the actor), and
# the trainer's at a random point (the two trainer cases kill it at the hand-off's most delicate points,
# with trained rollouts unacknowledged, which is what a kill mid-update leaves too).
@pytest.mark.parametrize("victim", ["trainer-mid-publish", "trainer-mid-persist", "policy", "redis"])
def test_kill_9_and_recover_loses_no_rollout(victim, stack_config: BelayConfig, tmp_path):
    # run until stopped, persist every 2 updates; a killed trainer's unacknowledged rollouts are claimed after 3 s
    config = variant(
        stack_config, {"trainer": {"max_steps": 0, "checkpoint_every_steps": 2}, "redis": {"claim_idle_ms": 3000}}
    )
    stack = LocalStack(config, tmp_path / "run", say=lambda *_: None)
    queue = RolloutQueue.from_url(config.redis.url, config.run.name)
    try:
        stack.start()
        stack.wait_healthy(180)
        wait_for_version(stack, queue, 3, 120)
        times = [step.time for _, step in queue.read_steps("0-0")]
        normal_step = (times[-1] - times[0]) / max(1, len(times) - 1)  # seconds between versions, unharmed
        caught = ""
        if victim == "trainer-mid-publish":
            caught = kill_inside(stack, published_dir(config.run), 300)
        elif victim == "trainer-mid-persist":
            caught = kill_inside(stack, pathlib.Path(config.run.checkpoint_dir), 300)
        else:
            time.sleep(0.3)  # into the next step: the trainer mid-update, the policy mid-batch
            stack.kill(victim)
        killed_at = time.monotonic()
        victim = victim.split("-")[0]
        if victim in ("reward", "redis"):
            time.sleep(2.0)  # the others see it gone and back off
        stack.restart(victim)
        recovered = wait_for_version(stack, queue, latest_version(queue) + 2, 240)
        lost = time.monotonic() - killed_at - 2 * normal_step
        for name in ("policy", "trainer"):
            stack.processes[name].popen.terminate()
            stack.processes[name].popen.wait(120)
        accounts = account_for_rollouts(config)
        assert accounts["trained"] >= 8 * 2  # at least the two updates after the recovery
        assert accounts["written"] == (
            accounts["trained"] + sum(accounts["dropped"].values()) + accounts["pending"] + accounts["unread"]
        )
        versions = [step.version for _, step in queue.read_steps("0-0")]
        assert versions == sorted(set(versions)), "a version number was used twice"
        print(
            "FAULT "
            + json.dumps(
                {
                    "victim": victim,
                    "killed_inside": caught,
                    "seconds_to_two_more_versions": round(recovered, 1),
                    "normal_step_seconds": round(normal_step, 1),
                    "seconds_lost_vs_normal": round(max(lost, 0.0), 1),
                    **accounts,
                }
            )
        )
    finally:
        stack.stop(grace=30)
