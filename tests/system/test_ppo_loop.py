"""The whole loop as real processes: redis-server, reference, reward, policy and trainer started
with the same commands the containers run, on tiny real models."""

from __future__ import annotations

import pathlib
import time

import numpy as np
import pytest
import torch

from belay.v1 import belay_pb2, belay_pb2_grpc
from services.common.checkpoints import committed_versions
from services.common.config import BelayConfig
from services.common.models import load_causal_lm, load_tokenizer, response_logprobs
from services.common.packing import pack_int32, unpack_float32
from services.common.prompts import read_prompts
from services.common.review_store import ReviewStore
from services.common.rollout_queue import RolloutQueue
from services.common.rpc import channel
from services.launcher import follow, wait_for_policy_version
from services.local_stack import LocalStack
from services.policy.engine import apply_chat_template
from tests.system.conftest import account_for_rollouts


def fixed_sequence(model_dir: pathlib.Path) -> tuple[list[int], list[int]]:
    tokenizer = load_tokenizer(str(model_dir))
    prompt = apply_chat_template(tokenizer, "Describe a walk in the park.")
    response = tokenizer("I love this, it is good.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, response


def rpc_logprobs(stub, prompt: list[int], response: list[int]) -> tuple[np.ndarray, int]:
    reply = stub.LogProbs(
        belay_pb2.LogProbsRequest(
            prompt_ids=pack_int32([prompt]), response_ids=pack_int32([response]), temperature=1.0
        ),
        timeout=30,
    )
    return unpack_float32(reply.logprobs)[0], reply.policy_version


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_three_ppo_iterations_hot_swap_and_no_rollout_lost(stack_config: BelayConfig, tmp_path, tiny_lm_dir):
    config = stack_config
    stack = LocalStack(config, tmp_path / "run", say=lambda *_: None)
    try:
        stack.start()
        stack.wait_healthy(180)
        steps = follow(config, stack, iterations=3, say=lambda *_: None)

        # The policy version advances one per update; at max_steps the trainer persists the last one.
        assert stack.processes["trainer"].popen.wait(120) == 0
        assert [s.version for s in steps] == [1, 2, 3]
        assert [v for v, _ in committed_versions(config.run.checkpoint_dir)][-1] == 3
        for step in steps:
            assert np.isfinite([step.stats.kl_per_token, step.stats.reward_mean, step.stats.loss]).all()
            assert step.rollouts == 8
            assert max(step.rollout_versions) <= step.version - 1  # trained on older samples only

        # After the hot-swap, the policy's LogProbs are the trainer's own computation on v3's weights.
        assert wait_for_policy_version(config, 3, 60) == 3
        policy = belay_pb2_grpc.PolicyStub(channel(config.policy.address, config.grpc))
        reference = belay_pb2_grpc.ReferenceStub(channel(config.reference.address, config.grpc))
        prompt, response = fixed_sequence(tiny_lm_dir)
        served, version = rpc_logprobs(policy, prompt, response)
        assert version == 3
        v3_dir = dict(committed_versions(config.run.checkpoint_dir))[3]
        trainer_model = load_causal_lm(str(v3_dir), torch.device("cpu"), "v3")
        tokenizer = load_tokenizer(str(v3_dir))
        expected = response_logprobs(trainer_model, [prompt], [response], tokenizer.pad_token_id)[0].numpy()
        np.testing.assert_allclose(served, expected, atol=1e-4)
        frozen, _ = rpc_logprobs(reference, prompt, response)
        assert np.abs(frozen - served).max() > 1e-3, "the policy moved, the reference must not have"
        reference_model = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "sft")
        np.testing.assert_allclose(
            frozen,
            response_logprobs(reference_model, [prompt], [response], tokenizer.pad_token_id)[0].numpy(),
            atol=1e-5,
        )

        # For the review page: every trained rollout with its KL (sum of behaviour - reference logprobs),
        # newest first; and the canaries answered by each version served so far, 0 first with no drift.
        review = ReviewStore.from_url(config.redis.url, config.run.name)
        samples = review.recent_samples(100)
        assert len(samples) == 8 * 3 and [s["trained_into"] for s in samples[::8]] == [3, 2, 1]
        assert all(s["version"] <= s["trained_into"] - 1 and s["response"] is not None for s in samples)
        assert np.mean([s["kl"] for s in samples[:8]]) == pytest.approx(
            steps[-1].stats.kl_per_sequence, rel=1e-4, abs=1e-5
        )
        deadline = time.monotonic() + 60
        while not review.has_canaries(3):  # answered right after the swap to 3
            assert time.monotonic() < deadline, f"no canaries for version 3: {list(review.canaries())}"
            time.sleep(0.2)
        canaries = review.canaries()
        assert canaries[0]["drift"] == 0.0 and set(canaries) <= {0, 1, 2, 3}
        assert canaries[0]["prompts"] == read_prompts(config.policy.canary_prompts_file)
        assert 0.0 <= canaries[3]["drift"] <= 1.0

        # The services export their signals.
        trainer_metrics = scrape(config.trainer.metrics_port) if stack.processes["trainer"].popen.poll() is None else ""
        policy_metrics = scrape(config.policy.metrics_port)
        assert "belay_policy_version 3.0" in policy_metrics
        assert "belay_policy_generated_tokens_total" in policy_metrics
        if trainer_metrics:
            assert "belay_trainer_kl_per_token" in trainer_metrics

        # The trainer stopped after max_steps=3; restarted, it resumes from v3 and publishes v4.
        stack.processes["trainer"].popen.wait(60)
        assert stack.processes["trainer"].popen.returncode == 0
        stack.start(("trainer",))
        queue = RolloutQueue.from_url(config.redis.url, config.run.name)
        deadline = time.monotonic() + 180
        while 4 not in [s.version for _, s in queue.read_steps("0-0")]:
            stack.check_alive()
            assert time.monotonic() < deadline, "the restarted trainer published no version 4"
            time.sleep(0.5)
        versions = [s.version for _, s in queue.read_steps("0-0")]
        assert versions[:4] == [1, 2, 3, 4]

        # Stop the producers and the trainer, then account for every rollout ever written.
        for name in ("policy", "trainer"):
            stack.processes[name].popen.terminate()
            stack.processes[name].popen.wait(120)
        accounts = account_for_rollouts(config)
        assert accounts["trained"] >= 8 * 4
        assert accounts["written"] == (
            accounts["trained"] + sum(accounts["dropped"].values()) + accounts["pending"] + accounts["unread"]
        )
    finally:
        stack.stop(grace=30)
