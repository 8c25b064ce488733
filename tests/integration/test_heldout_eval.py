"""Evaluation during the run, over real gRPC and a real redis-server: the policy's actor answers the
held-out rows (never the training rows) at every eval_every-th version, scores them through the reward
and reference services, keeps the figures in Redis and on /metrics, once per version; the trainer marks
the best persisted version in best.json."""

from __future__ import annotations

import json
import math
import pathlib

import redis
import torch
from prometheus_client import CollectorRegistry

from services.common.checkpoints import write_checkpoint
from services.common.models import load_causal_lm, load_tokenizer
from services.common.review_store import ReviewStore
from services.common.rollout_queue import RolloutQueue
from services.policy.actor import Actor
from services.policy.engine import PolicyEngine, Sampling
from services.policy.policy_metrics import PolicyMetrics
from services.policy.swaps import SwapRequests
from services.trainer.best_version import BEST_FILE, BestVersion
from tests.tiny_models import build_causal_lm

from .conftest import direct_logprobs, load_lm, make_config, running_reference, running_reward

ROWS = [{"question": f"What is {i} + {i}?", "answer": 2 * i} for i in range(10)]


def test_the_policy_evaluates_held_out_rows_once_per_due_version(tiny_lm_dir, redis_url, tmp_path):
    reference_dir = build_causal_lm(tmp_path / "reference", seed=7)  # other weights: a KL that is not 0
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = make_config(
        redis={"url": redis_url},
        reference={"model_dir": str(reference_dir)},
        reward={"backend": "python", "function": "tests.integration.test_data_source:answer_reward"},
        policy={"model_dir": str(tiny_lm_dir), "max_new_tokens": 5, "canary_prompts_file": "", "seed": 3},
        data={"path": str(path), "prompt_column": "question", "metadata_columns": ["answer"], "heldout_rows": 4},
        trainer={"eval_every": 2},
    )
    engine = PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"), load_tokenizer(str(tiny_lm_dir)), config.grpc
    )
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    queue.ensure_group()
    registry = CollectorRegistry()
    store = ReviewStore(queue.redis, config.run.name)
    with running_reference(config) as reference, running_reward(config) as reward:
        actor = Actor(config, engine, queue, reference.stub, reward.stub, SwapRequests(), PolicyMetrics(registry))
        actor.evaluate_heldout()
        first = store.evals()
        actor.evaluate_heldout()  # the same version again: not redone
        assert store.evals() == first
    heldout = actor.data.heldout
    assert len(heldout) == 4 and not {r.text for r in heldout} & {r.text for r in actor.data.train}
    record = first[0]
    answers = [row.metadata["answer"] for row in heldout]
    assert record["rows"] == 4 and record["accuracy"] is None  # a python reward: no answer checker
    assert record["reward_mean"] == sum(answers) / 4  # the reward saw each held-out row's own metadata

    # the KL against its formula: the same seeded draw again, both models' log-probs computed directly
    policy = config.policy
    batch = engine.generate(
        [row.chat for row in heldout],
        1,
        Sampling(temperature=policy.temperature, top_p=policy.top_p, max_new_tokens=5, seed=policy.seed),
    )
    policy_model, reference_model = load_lm(tiny_lm_dir), load_lm(reference_dir)
    kl = [
        math.fsum(direct_logprobs(policy_model, p, r)) - math.fsum(direct_logprobs(reference_model, p, r))
        for p, r in zip(batch.prompt_ids, batch.response_ids)
    ]
    assert abs(sum(kl) / 4) > 1e-3
    assert math.isclose(record["kl_per_sequence"], sum(kl) / 4, rel_tol=1e-3, abs_tol=1e-4)
    assert record["response_length"] == sum(len(r) for r in batch.response_ids) / 4
    assert registry.get_sample_value("belay_policy_eval_reward_mean") == record["reward_mean"]
    assert registry.get_sample_value("belay_policy_eval_version") == 0
    assert actor.heldout.due(2) and not actor.heldout.due(1) and not actor.heldout.due(0)


def test_the_trainer_marks_the_best_persisted_version(redis_url, tmp_path):
    store = ReviewStore.from_url(redis_url, "run")
    root = pathlib.Path(tmp_path / "checkpoints")
    for version in (2, 4):
        write_checkpoint(root, version, lambda directory: (directory / "w.txt").write_text("x"))
    best = BestVersion(root, store, "reward_mean")
    assert best.update() is None  # nothing evaluated yet
    store.record_eval(0, {"reward_mean": 0.5})
    store.record_eval(2, {"reward_mean": 0.25})
    store.record_eval(6, {"reward_mean": 0.9})  # evaluated, not persisted
    assert best.update()["version"] == 2 and best.update() is None  # said once
    store.record_eval(4, {"reward_mean": 0.75})
    marked = best.update()
    assert (marked["version"], marked["value"]) == (4, 0.75) and marked["path"].endswith("4")
    assert json.loads((root / BEST_FILE).read_text())["version"] == 4
    assert BestVersion(root, store, "reward_mean").marked["version"] == 4  # read back after a restart
