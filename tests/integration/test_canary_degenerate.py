"""The fifth detector provoked on a real loop: a reward that pays for one phrase (tests/rewards.py,
as the template-collapse provocation) drives the real Actor, a real tiny policy engine, real
reference and reward servers over loopback gRPC, real Redis and the real Trainer; after each swap
the actor answers the canary prompts greedily. The policy's /metrics is served over HTTP and
scraped after each update: its greedy canary answers must turn degenerate, the policy must say so
(belay_policy_canary_degenerate, the canary record in Redis, a WARNING with the runbook line), and
promtool, given the scraped series, must fire the repository's BelayCanaryDegenerate rule. A
healthy run (the tiny reward model, β 0.05, a small learning rate) must not."""

from __future__ import annotations

import logging
import threading

import torch
from prometheus_client import CollectorRegistry

from services.common.models import load_causal_lm, load_tokenizer
from services.common.review_store import ReviewStore
from services.common.rollout_queue import RolloutQueue
from services.policy.actor import Actor
from services.policy.canaries import RUNBOOK
from services.policy.engine import PolicyEngine
from services.policy.policy_metrics import PolicyMetrics
from services.policy.swaps import SwapRequests
from services.trainer.trainer import Trainer
from services.trainer.trainer_metrics import TrainerMetrics

from .conftest import make_config, running_reference, running_reward
from .test_failure_detectors import REPO, promtool_alerts, scrape, serving_metrics

CANARIES = "Tell me about your weekend.\nDescribe a walk in the park.\nHow are you feeling today?\n"


def run_with_canaries(tiny_lm_dir, tiny_reward_dir, redis_url, directory, updates, reward=None, trainer=None):
    """`updates` iterations (swap, answer the canaries, sample, score; update, publish), the policy's
    metrics scraped after each. Returns the scrapes and every version's canary record."""
    canary_file = directory / "canary.txt"
    canary_file.write_text(CANARIES)
    config = make_config(
        run={"name": "canaries", "checkpoint_dir": str(directory / "checkpoints")},
        redis={"url": redis_url, "block_ms": 200},
        policy={
            "model_dir": str(tiny_lm_dir),
            "prompts_file": str(REPO / "prompts/default.txt"),
            "max_new_tokens": 12,
            "prompts_per_batch": 4,
            "samples_per_prompt": 2,
            "canary_prompts_file": str(canary_file),
            "canary_max_new_tokens": 24,
        },
        reference={"model_dir": str(tiny_lm_dir)},
        reward=reward or {"backend": "hf_classifier", "model_dir": str(tiny_reward_dir)},
        trainer={
            "model_dir": str(tiny_lm_dir),
            "batch_size": 8,
            "minibatch_size": 4,
            "ppo_epochs": 2,
            **(trainer or {}),
        },
    )
    device = torch.device("cpu")
    queue = RolloutQueue.from_url(redis_url, config.run.name)
    learner = Trainer(
        config,
        load_causal_lm(str(tiny_lm_dir), device, "trainer"),
        load_tokenizer(str(tiny_lm_dir)),
        queue,
        TrainerMetrics(CollectorRegistry()),
    )
    engine = PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), device, "policy"), load_tokenizer(str(tiny_lm_dir)), config.grpc
    )
    registry = CollectorRegistry()
    scrapes = []
    with running_reference(config) as reference, running_reward(config) as scorer, serving_metrics(registry) as url:
        actor = Actor(config, engine, queue, reference.stub, scorer.stub, SwapRequests(), PolicyMetrics(registry))
        queue.ensure_group()
        for _ in range(updates):
            actor.take_new_weights()
            actor.answer_canaries()
            scrapes.append(scrape(url))
            actor.run_batch()
            assert learner.step(learner.collect(threading.Event())) is not None
        actor.take_new_weights()
        actor.answer_canaries()
        scrapes.append(scrape(url))
    return scrapes, ReviewStore.from_url(redis_url, config.run.name).canaries()


def test_a_reward_for_one_phrase_makes_the_canaries_degenerate_and_fires_the_alert(
    tiny_lm_dir, tiny_reward_dir, redis_url, tmp_path, caplog
):
    """β = 0 and lr 0.05 under the one-phrase reward: within ~15 updates the tiny model answers
    every canary with the phrase's words in a loop (" and is and is ...")."""
    one_phrase = {"backend": "python", "function": "tests.rewards:one_phrase"}
    with caplog.at_level(logging.WARNING, logger="services.policy.canaries"):
        scrapes, canaries = run_with_canaries(
            tiny_lm_dir, tiny_reward_dir, redis_url, tmp_path, 18, one_phrase, {"kl_coef": 0.0, "lr": 0.05}
        )
    first, last = canaries[0], canaries[max(canaries)]
    assert first["degenerate"] == []  # version 0 is its own baseline
    assert last["degenerate"] == [0, 1, 2], last["outputs"]
    for signals, text in zip(last["signals"], last["outputs"]):
        assert signals["repeated_ngram_share"] > 0.5 and signals["longest_repeated_span"] >= 6, text
        assert signals["compression_ratio"] > 2
    degenerate = scrapes[-1][("belay_policy_canary_degenerate", ())]
    assert degenerate == 3
    assert any("canary_degenerate" in r.getMessage() and RUNBOOK in r.getMessage() for r in caplog.records)
    summary = "3 canary answers of the policy on policy:9101 are degenerate (looping, or off the question)"
    promtool_alerts(scrapes, {"BelayCanaryDegenerate": summary}, tmp_path, "policy", "policy:9101")


def test_a_healthy_run_keeps_its_canaries_and_raises_no_alert(tiny_lm_dir, tiny_reward_dir, redis_url, tmp_path):
    """The tiny reward model, β 0.05 and lr 1e-3 (as the healthy run of the four detectors): the
    greedy answers may move, but never into a loop, and the alert never fires."""
    scrapes, canaries = run_with_canaries(tiny_lm_dir, tiny_reward_dir, redis_url, tmp_path, 14, None, {"lr": 1e-3})
    assert all(record["degenerate"] == [] for record in canaries.values()), canaries
    assert all(scraped[("belay_policy_canary_degenerate", ())] == 0 for scraped in scrapes)
    promtool_alerts(scrapes, {"BelayCanaryDegenerate": None}, tmp_path, "policy", "policy:9101")
