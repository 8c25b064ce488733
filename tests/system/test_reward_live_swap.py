"""Swapping the reward service while a run goes on: stop it, start a different one on the same
address. Rollout production pauses, resumes with the new reward, and the reward model id changes
at that point in the stream and in the trainer's metrics; no rollout is lost."""

from __future__ import annotations

import sys
import time
import urllib.request

import redis

from services.common.config import BelayConfig
from services.common.rollout_queue import RolloutQueue
from services.local_stack import LocalStack
from tests.system.conftest import REPO, account_for_rollouts, variant
from tests.system.test_faults import wait_for_version

EXAMPLE_ID = "example-ends-with-full-stop"


def test_reward_service_swapped_mid_run(stack_config: BelayConfig, tmp_path):
    config = variant(stack_config, {"trainer": {"max_steps": 0}, "reward": {"backend": "vader", "model_dir": ""}})
    stack = LocalStack(config, tmp_path / "run", say=lambda *_: None)
    queue = RolloutQueue.from_url(config.redis.url, config.run.name)
    try:
        stack.start()
        stack.wait_healthy(180)
        wait_for_version(stack, queue, 2, 120)
        stack.processes["reward"].popen.terminate()  # the operator stops the old reward service ...
        stack.processes["reward"].popen.wait(30)
        swapped_at = queue.redis.xlen(queue.stream)
        time.sleep(2.0)  # ... rollout production pauses meanwhile ...
        paused = queue.redis.xlen(queue.stream)
        stack._spawn(
            "reward",
            [sys.executable, str(REPO / "examples/reward_server/server.py"), "--address", config.reward.address],
        )  # ... and starts another on the address
        after = max(s.version for _, s in queue.read_steps("0-0")) + 3
        wait_for_version(stack, queue, after, 240)

        ids = [
            fields[b"reward_model_id"].decode()
            for _, fields in redis.Redis.from_url(config.redis.url).xrange(queue.stream)
        ]
        assert paused - swapped_at <= 8 * 1  # at most the batch that was already scored when it stopped
        switch = ids.index(EXAMPLE_ID)
        assert set(ids[:switch]) == {"vader-sentiment"} and set(ids[switch:]) == {EXAMPLE_ID}
        with urllib.request.urlopen(f"http://127.0.0.1:{config.trainer.metrics_port}/metrics", timeout=5) as reply:
            metrics = reply.read().decode()
        assert f'belay_trainer_reward_model_info{{reward_model_id="{EXAMPLE_ID}"}} 1.0' in metrics
        assert 'belay_trainer_reward_model_info{reward_model_id="vader-sentiment"} 0.0' in metrics
        for name in ("policy", "trainer"):
            stack.processes[name].popen.terminate()
            stack.processes[name].popen.wait(120)
        accounts = account_for_rollouts(config)
        assert accounts["written"] == (
            accounts["trained"] + sum(accounts["dropped"].values()) + accounts["pending"] + accounts["unread"]
        )
    finally:
        stack.stop(grace=30)
