"""The trainer's data-parallel path: two processes under torchrun with gloo on CPU, with DDP and with
FSDP2 (trainer.parallelism), finish PPO updates on rollouts from the real stream, with identical
weights on both ranks and those weights persisted as a Hugging Face directory."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import redis
import torch
import yaml

from services.common.checkpoints import committed_versions
from services.common.config import BelayConfig
from services.common.models import load_causal_lm, load_tokenizer, weights_fingerprint
from services.common.rollout_queue import Rollout, RolloutQueue
from services.policy.engine import PolicyEngine, Sampling
from tests.conftest import free_port
from tests.system.conftest import REPO


def fill_stream(config: BelayConfig, model_dir, batches: int, kl_per_token: tuple[float, ...] = ()) -> None:
    """`batches` batches of 8 rollouts at version 0; batch i's reference log-probs kl_per_token[i]
    (default 0.1) below the sampler's on every token."""
    tokenizer = load_tokenizer(str(model_dir))
    engine = PolicyEngine(load_causal_lm(str(model_dir), torch.device("cpu"), "p"), tokenizer, config.grpc)
    queue = RolloutQueue(redis.Redis.from_url(config.redis.url), config.run.name)
    queue.ensure_group()
    for index in range(batches):
        prompts = ["Tell me about your weekend.", "Hi", "How are you feeling today?", "Describe a walk."]
        batch = engine.generate(prompts, 2, Sampling(max_new_tokens=8, seed=index))
        queue.add_all(
            [
                Rollout(
                    prompt_text=prompts[batch.prompt_index[r]],
                    response_text=batch.texts[r],
                    prompt_ids=np.array(batch.prompt_ids[r]),
                    response_ids=np.array(batch.response_ids[r]),
                    logprobs=np.array(batch.logprobs[r], np.float32),
                    ref_logprobs=np.array(batch.logprobs[r], np.float32) - (kl_per_token or (0.1,) * batches)[index],
                    reward=float(r % 3),
                    policy_version=0,
                    finish_reason=batch.finish_reasons[r],
                    group_id=f"{index}-{batch.prompt_index[r]}",
                )
                for r in range(8)
            ]
        )


def run_torchrun(config: BelayConfig, tmp_path) -> dict[int, dict[int, str]]:
    """The trainer under torchrun, 2 gloo ranks, to its end: {version: {rank: weights fingerprint}}."""
    config_file = tmp_path / "belay.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "-m",
            "services.trainer",
            "--config",
            str(config_file),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    fingerprints = {}
    for rank, version, fingerprint in re.findall(r"rank (\d) weights after version (\d+): (\w+)", output):
        fingerprints.setdefault(int(version), {})[int(rank)] = fingerprint
    for version, by_rank in fingerprints.items():
        assert set(by_rank) == {0, 1} and by_rank[0] == by_rank[1], f"ranks differ after version {version}"
    return {version: by_rank[0] for version, by_rank in fingerprints.items()}


def torchrun_config(stack_config, redis_url, **trainer) -> BelayConfig:
    data = stack_config.model_dump()
    data["redis"]["url"] = redis_url
    data["trainer"].update(max_staleness=5, ppo_epochs=2, checkpoint_every_steps=1, **trainer)
    data["run"]["log_level"] = "DEBUG"  # each rank then logs its weights' fingerprint after every step
    return BelayConfig.model_validate(data)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_gloo_ranks_finish_updates_with_identical_weights(
    parallelism, stack_config, redis_url, tiny_lm_dir, tmp_path
):
    config = torchrun_config(stack_config, redis_url, max_steps=2, parallelism=parallelism)
    fill_stream(config, tiny_lm_dir, batches=2)
    fingerprints = run_torchrun(config, tmp_path)
    assert sorted(fingerprints) == [1, 2]
    assert fingerprints[1] != fingerprints[2]  # they trained
    committed = committed_versions(config.run.checkpoint_dir)
    assert [v for v, _ in committed] == [1, 2]  # rank 0 alone wrote
    persisted = load_causal_lm(str(committed[-1][1]), torch.device("cpu"), "v2")  # a Hugging Face directory
    assert weights_fingerprint(persisted)[:16] == fingerprints[2]  # the whole weights the ranks hold
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    assert queue.pending_count() == 0 and queue.latest_version()[0] == 2


# fsdp alone for CI time (17 s): the rollback's decision travels the same way under ddp, and a rollback
# under fsdp also reads each rank's rows of the good version (gathering.load_weight_rows).
@pytest.mark.parametrize("parallelism", ["fsdp"])
def test_the_kl_rail_rolls_every_rank_back_to_the_same_weights(
    parallelism, stack_config, redis_url, tiny_lm_dir, tmp_path
):
    """Two good batches (0.8 nats per response), then one at ~24 nats past kl_hard_limit 2: rank 0
    rolls back to the SFT model (the batch was sampled at version 0) and so does rank 1."""
    config = torchrun_config(stack_config, redis_url, max_steps=3, parallelism=parallelism, kl_hard_limit=2.0)
    fill_stream(config, tiny_lm_dir, batches=3, kl_per_token=(0.1, 0.1, 3.0))
    fingerprints = run_torchrun(config, tmp_path)
    assert sorted(fingerprints) == [1, 2, 3]
    sft = weights_fingerprint(load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "sft"))[:16]
    assert fingerprints[2] != sft and fingerprints[3] == sft
    assert [v for v, _ in committed_versions(config.run.checkpoint_dir)] == [1, 2, 3]
