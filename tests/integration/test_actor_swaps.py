"""The actor takes new weights between batches from the version Redis announces, and a bad
checkpoint never stops it: the old weights keep serving."""

from __future__ import annotations

import pathlib

import redis
import torch
from prometheus_client import CollectorRegistry

from services.common.models import load_causal_lm, load_tokenizer, weights_fingerprint
from services.common.rollout_queue import RolloutQueue
from services.policy.actor import Actor
from services.policy.engine import PolicyEngine
from services.policy.policy_metrics import PolicyMetrics
from services.policy.swaps import SwapRequests

from .conftest import make_config
from .test_policy_service import commit, tiny_model

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_actor_swaps_to_announced_versions_and_survives_a_bad_one(tiny_lm_dir, redis_url, tmp_path):
    root = tmp_path / "checkpoints"
    config = make_config(
        run={"checkpoint_dir": str(root)},
        redis={"url": redis_url},
        policy={"model_dir": str(tiny_lm_dir), "prompts_file": str(REPO / "prompts/default.txt")},
    )
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    engine = PolicyEngine(load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"), tokenizer, config.grpc)
    metrics = PolicyMetrics(CollectorRegistry())
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    actor = Actor(config, engine, queue, None, None, SwapRequests(), metrics)

    bad = commit(root, 1, tiny_model(tokenizer, seed=3, hidden_size=64, intermediate_size=128))
    queue.publish_version(1, str(bad))
    before = engine.loaded.revision
    actor.take_new_weights()  # refused, logged, counted; no exception
    assert engine.version == 0 and engine.loaded.revision == before
    assert metrics.batch_failures.labels(reason="swap")._value.get() == 1
    actor.take_new_weights()  # not retried every batch
    assert metrics.batch_failures.labels(reason="swap")._value.get() == 1

    good_model = tiny_model(tokenizer, seed=4)
    good = commit(root, 2, good_model)
    queue.publish_version(2, str(good))
    actor.take_new_weights()
    assert engine.version == 2
    assert engine.loaded.revision == weights_fingerprint(good_model)

    queue.publish_version(3, str(tmp_path / "elsewhere" / "v000003"))  # outside the checkpoint dir
    actor.take_new_weights()
    assert engine.version == 2
