"""Canary prompts: answered greedily once per version served, kept in Redis per version, and their
drift from the first version exported; a restarted policy does not answer a version twice."""

from __future__ import annotations

import pathlib

import redis
import torch
from prometheus_client import CollectorRegistry

from services.common.models import load_causal_lm, load_tokenizer
from services.common.review_store import ReviewStore
from services.common.rollout_queue import RolloutQueue
from services.policy.actor import Actor
from services.policy.canaries import canary_drift
from services.policy.engine import PolicyEngine
from services.policy.policy_metrics import PolicyMetrics
from services.policy.swaps import SwapRequests

from .conftest import make_config
from .test_policy_service import commit

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_each_version_answers_the_canaries_once_and_exports_its_drift(tiny_lm_dir, redis_url, tmp_path):
    canary_file = tmp_path / "canary.txt"
    canary_file.write_text("# comment lines are skipped\nTell me about your weekend.\nHow are you feeling today?\n")
    root = tmp_path / "checkpoints"
    config = make_config(
        run={"checkpoint_dir": str(root)},
        redis={"url": redis_url},
        policy={
            "model_dir": str(tiny_lm_dir),
            "prompts_file": str(REPO / "prompts/default.txt"),
            "canary_prompts_file": str(canary_file),
            "canary_max_new_tokens": 6,
        },
    )
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    engine = PolicyEngine(load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"), tokenizer, config.grpc)
    registry = CollectorRegistry()
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    actor = Actor(config, engine, queue, None, None, SwapRequests(), PolicyMetrics(registry))
    store = ReviewStore.from_url(redis_url, config.run.name)

    actor.answer_canaries()
    first = store.canaries()[0]
    assert first["prompts"] == ["Tell me about your weekend.", "How are you feeling today?"]
    assert len(first["outputs"]) == 2 and first["drift"] == 0.0
    assert all(0 < len(ids) <= 6 for ids in first["output_ids"])
    assert first["outputs"] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in first["output_ids"]]
    assert registry.get_sample_value("belay_policy_canary_version") == 0

    actor.answer_canaries()  # same version: nothing new
    assert list(store.canaries()) == [0]

    moved = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "moved")
    with torch.no_grad():  # the first answer's first token can no longer win (tied embeddings: its logit is 0)
        moved.get_input_embeddings().weight[first["output_ids"][0][0]] = 0.0
    queue.publish_version(1, str(commit(root, 1, moved)))
    actor.take_new_weights()
    actor.answer_canaries()
    second = store.canaries()[1]
    expected = canary_drift(first["output_ids"], second["output_ids"])
    assert second["drift"] == expected > 0  # other weights, other greedy answers
    assert registry.get_sample_value("belay_policy_canary_drift") == expected
    assert registry.get_sample_value("belay_policy_canary_version") == 1

    # A restarted policy (a new actor, same Redis) finds version 1 answered and leaves it.
    again = Actor(config, engine, queue, None, None, SwapRequests(), PolicyMetrics(CollectorRegistry()))
    assert again.canaries.answer(engine) is None
    assert store.canaries()[1]["time"] == second["time"]


def test_no_canaries_when_the_file_is_empty_string(tiny_lm_dir, redis_url, tmp_path):
    config = make_config(
        redis={"url": redis_url},
        policy={
            "model_dir": str(tiny_lm_dir),
            "canary_prompts_file": "",
            "prompts_file": str(REPO / "prompts/default.txt"),
        },
    )
    engine = PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"),
        load_tokenizer(str(tiny_lm_dir)),
        config.grpc,
    )
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    actor = Actor(config, engine, queue, None, None, SwapRequests(), PolicyMetrics(CollectorRegistry()))
    actor.answer_canaries()
    assert ReviewStore.from_url(redis_url, config.run.name).canaries() == {}
