"""System-test fixtures: a whole-stack config on free loopback ports with tiny real models."""
from __future__ import annotations

import pathlib

import pytest

from services.common.config import BelayConfig
from tests.conftest import free_port

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def stack_config(tmp_path, tiny_lm_dir, tiny_reward_dir) -> BelayConfig:
    ports = [free_port() for _ in range(8)]
    return BelayConfig.model_validate({
        "run": {"name": "system", "checkpoint_dir": str(tmp_path / "run" / "checkpoints")},
        "redis": {"url": f"redis://127.0.0.1:{ports[0]}/0", "max_queue_lag": 8, "block_ms": 200},
        "policy": {"model_dir": str(tiny_lm_dir), "prompts_file": str(REPO / "prompts/default.txt"),
                   "address": f"127.0.0.1:{ports[1]}", "metrics_port": ports[5], "max_new_tokens": 12,
                   "prompts_per_batch": 4, "samples_per_prompt": 2, "torch_threads": 1},
        "reference": {"model_dir": str(tiny_lm_dir), "address": f"127.0.0.1:{ports[2]}",
                      "metrics_port": ports[6], "torch_threads": 1},
        "reward": {"backend": "hf_classifier", "model_dir": str(tiny_reward_dir),
                   "address": f"127.0.0.1:{ports[3]}", "metrics_port": ports[7]},
        "trainer": {"model_dir": str(tiny_lm_dir), "metrics_port": ports[4], "policy_address": f"127.0.0.1:{ports[1]}",
                    "batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, "lr": 3e-3, "max_steps": 3,
                    "max_staleness": 1, "torch_threads": 1},
    })
