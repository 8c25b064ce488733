"""Whole-stack runs with the toolbox's heavier options: GAE with a critic, the group baseline with
several samples per prompt, and LoRA adapters hot-swapped into the policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from belay.v1 import belay_pb2_grpc
from services.common.checkpoints import committed_versions
from services.common.config import BelayConfig
from services.common.lora import LoraSettings, load_adapter_into, wrap_with_lora
from services.common.models import load_causal_lm, load_tokenizer, response_logprobs
from services.common.rpc import channel
from services.launcher import follow, wait_for_policy_version
from services.local_stack import LocalStack
from tests.system.conftest import variant
from tests.system.test_ppo_loop import fixed_sequence, rpc_logprobs

RUNS = {
    "gae": {"trainer": {"advantage": "gae", "lam": 0.95, "value_coef": 0.1}},
    "group": {
        "trainer": {"advantage": "group", "group_scale_by_std": True},
        "policy": {"samples_per_prompt": 4, "prompts_per_batch": 2},
    },
    "lora": {"lora": {"enabled": True, "r": 4, "alpha": 8}},
}


@pytest.mark.parametrize("name", list(RUNS))
def test_run_completes_several_iterations(name, stack_config, tmp_path, tiny_lm_dir):
    config = variant(stack_config, RUNS[name])
    stack = LocalStack(config, tmp_path / "run", say=lambda *_: None)
    try:
        stack.start()
        stack.wait_healthy(180)
        steps = follow(config, stack, iterations=3, say=lambda *_: None)
        assert [s.version for s in steps] == [1, 2, 3]
        for step in steps:
            assert np.isfinite([step.stats.loss, step.stats.kl_per_sequence, step.stats.reward_mean]).all()
            assert step.stats.optimizer_steps > 0
        if name == "gae":
            assert all(np.isfinite(s.stats.value_loss) for s in steps)
        if name == "lora":
            assert stack.processes["trainer"].popen.wait(120) == 0  # max_steps: the last version persisted
            check_lora_hot_swap(config, tiny_lm_dir)
    finally:
        stack.stop(grace=30)


def check_lora_hot_swap(config: BelayConfig, base_dir) -> None:
    """Adapters moved the policy's LogProbs; the reference is the untouched base model."""
    v3 = dict(committed_versions(config.run.checkpoint_dir))[3]
    assert (v3 / "adapter_model.safetensors").is_file() and not (v3 / "model.safetensors").exists()
    assert wait_for_policy_version(config, 3, 60) == 3
    prompt, response = fixed_sequence(base_dir)
    policy = belay_pb2_grpc.PolicyStub(channel(config.policy.address, config.grpc))
    reference = belay_pb2_grpc.ReferenceStub(channel(config.reference.address, config.grpc))
    served, version = rpc_logprobs(policy, prompt, response)
    frozen, _ = rpc_logprobs(reference, prompt, response)
    pad = load_tokenizer(str(base_dir)).pad_token_id
    trained = wrap_with_lora(
        load_causal_lm(str(base_dir), torch.device("cpu"), "base"), LoraSettings(r=4, alpha=8)
    ).eval()
    load_adapter_into(trained, v3)
    np.testing.assert_allclose(served, response_logprobs(trained, [prompt], [response], pad)[0].numpy(), atol=1e-4)
    base = load_causal_lm(str(base_dir), torch.device("cpu"), "base")
    np.testing.assert_allclose(frozen, response_logprobs(base, [prompt], [response], pad)[0].numpy(), atol=1e-5)
    assert np.abs(served - frozen).max() > 1e-3
