"""The trainer against a real redis-server: what it reads, drops, trains on and acknowledges."""

from __future__ import annotations

import json
import pathlib
import threading
import time

import numpy as np
import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from services.common.checkpoints import committed_versions, load_trainer_state
from services.common.models import load_causal_lm, load_tokenizer
from services.common.published import published_dir
from services.common.rollout_queue import GROUP, Rollout, RolloutQueue
from services.trainer.lineage import Lineage
from services.trainer.trainer import Trainer
from services.trainer.trainer_metrics import TrainerMetrics

from .conftest import make_config


def rollout(tokenizer, version: int, reward: float, seed: int) -> Rollout:
    rng = np.random.default_rng(seed)
    prompt = tokenizer("Tell me about your weekend.")["input_ids"]
    response = rng.integers(3, len(tokenizer), size=5).tolist()
    return Rollout(
        prompt_text="p",
        response_text="r",
        prompt_ids=np.array(prompt),
        response_ids=np.array(response),
        logprobs=np.full(5, -5.0, np.float32),
        ref_logprobs=np.full(5, -5.2, np.float32),
        reward=reward,
        policy_version=version,
        finish_reason="length",
        group_id=f"g{seed}",
    )


def make_trainer(tiny_lm_dir, redis_url, tmp_path, **trainer):
    config = make_config(
        run={"checkpoint_dir": str(tmp_path / "checkpoints")},
        redis={"url": redis_url, "block_ms": 50},
        trainer={"model_dir": str(tiny_lm_dir), "batch_size": 8, "minibatch_size": 4, **trainer},
    )
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    model = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "trainer")
    return Trainer(config, model, load_tokenizer(str(tiny_lm_dir)), queue, TrainerMetrics(CollectorRegistry()))


def test_restarted_trainer_walks_its_pending_entries_drops_stale_ones_and_trains_on_the_rest(
    tiny_lm_dir, redis_url, tmp_path
):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path, max_staleness=1)
    trainer.version, trainer.lineage = 5, Lineage.from_state(None, 5)  # as resumed from a version-5 checkpoint
    queue = trainer.queue
    queue.ensure_group()
    ids = [
        queue.add(rollout(trainer.tokenizer, version=1 if i % 5 == 0 else 5, reward=float(i), seed=i))
        for i in range(20)
    ]
    queue.read(trainer.intake.consumer, 100, 10)  # a previous life of this consumer read them all, then died
    assert queue.pending_count() == 20

    first = trainer.collect(stop=threading.Event())
    second = trainer.collect(stop=threading.Event())
    stale = {ids[i] for i in range(20) if i % 5 == 0}
    taken = [e for e, _ in first] + [e for e, _ in second]
    assert len(first) == 8 and len(second) == 8
    assert set(taken) == set(ids) - stale and len(set(taken)) == 16  # each fresh one once, none stale
    dropped = queue.redis.xrange(queue.dropped_stream)
    assert {f[b"source_entry"].decode() for _, f in dropped} == stale
    assert all(f[b"drop_reason"] == b"stale" for _, f in dropped)
    assert queue.pending_count() == 16  # taken but not yet trained on: still pending, not acked


def test_each_step_publishes_and_only_a_committed_persist_acknowledges_its_rollouts(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path, checkpoint_every_steps=2)
    queue = trainer.queue
    queue.ensure_group()
    for i in range(8):
        queue.add(rollout(trainer.tokenizer, version=0, reward=float(i % 3), seed=i))
    stop = threading.Event()
    first = trainer.collect(stop)
    summary = trainer.step(first)
    assert summary.version == 1 and trainer.version == 1
    # Published (weights only, in the publish directory), announced, not persisted, not acknowledged.
    version, path = queue.latest_version()
    published = pathlib.Path(path)
    assert version == 1 and published.parent == published_dir(trainer.config.run) and published.name == "v000001"
    assert sorted(p.name for p in published.iterdir()) == ["MANIFEST.json", "model.safetensors"]
    assert committed_versions(trainer.config.run.checkpoint_dir) == []
    assert queue.pending_count() == 8 and queue.awaiting_persist() == 8
    assert summary.publish_bytes == (published / "model.safetensors").stat().st_size

    # A redelivery of a rollout awaiting its persist (a Redis blip re-walks our pending entries) is
    # neither trained again nor acknowledged early.
    trainer.intake.pending_cursor = "0"
    for i in range(8):
        queue.add(rollout(trainer.tokenizer, version=1, reward=float(i), seed=100 + i))
    second = trainer.collect(stop)
    assert {e for e, _ in second}.isdisjoint({e for e, _ in first}) and len(second) == 8
    assert queue.pending_count() == 16
    trainer.step(second)  # the second update: a persist is due (checkpoint_every_steps=2)
    trainer.persister.wait()
    assert [v for v, _ in committed_versions(trainer.config.run.checkpoint_dir)] == [2]
    assert queue.pending_count() == 0 and queue.awaiting_persist() == 0  # acknowledged, after the commit
    state = load_trainer_state(committed_versions(trainer.config.run.checkpoint_dir)[0][1])[1]
    assert set(state["consumed_rollout_ids"]) == {r.rollout_id for _, r in first + second}
    assert [json.loads(f[b"json"])["version"] for _, f in queue.redis.xrange(queue.steps_stream)] == [1, 2]

    # At-least-once: the same rollout delivered again (a crash between commit and ack) is acked, not trained.
    queue.add(first[0][1])
    for i in range(8):
        queue.add(rollout(trainer.tokenizer, version=2, reward=float(i), seed=200 + i))
    again = trainer.collect(stop)
    assert first[0][1].rollout_id not in {r.rollout_id for _, r in again}
    assert trainer.metrics.dropped.labels(reason="duplicate")._value.get() == 1
    assert len(again) == 8
    group = next(g for g in queue.redis.xinfo_groups(queue.stream) if g["name"].decode() == GROUP)
    assert group["pending"] == 8


def test_a_new_trainer_claims_rollouts_a_dead_one_left_unacknowledged(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    trainer.config.redis.claim_idle_ms = 1
    queue = trainer.queue
    queue.ensure_group()
    ids = [queue.add(rollout(trainer.tokenizer, version=0, reward=float(i), seed=i)) for i in range(10)]
    queue.read("dead-host:1234", 100, 10)  # a trainer that read them, then died without acking
    assert queue.pending_count() == 10
    time.sleep(0.01)
    batch = trainer.collect(threading.Event())
    assert [e for e, _ in batch] == ids[:8]
    queue.ack([e for e, _ in batch])  # as step() does after its checkpoint
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()  # nothing new will come: let collect give up after a second
    second = trainer.collect(stop)
    assert [e for e, _ in second] == ids[8:]
    pending = queue.redis.xpending_range(queue.stream, GROUP, "-", "+", count=100)
    assert {p["consumer"].decode() for p in pending} == {trainer.intake.consumer}


def test_a_combined_rewards_parts_are_averaged_in_the_step_and_exported(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    queue = trainer.queue
    queue.ensure_group()
    for i in range(8):
        item = rollout(trainer.tokenizer, version=0, reward=float(i), seed=i)
        item.reward_components = {"polite": 1.0, "short": float(i)}
        queue.add(item)
    summary = trainer.step(trainer.collect(threading.Event()))
    assert summary.reward_components == {"polite": 1.0, "short": sum(range(8)) / 8}
    gauge = trainer.metrics.reward_components
    assert gauge.labels(component="short")._value.get() == 3.5


def test_a_non_finite_update_publishes_nothing_and_training_continues(tiny_lm_dir, redis_url, tmp_path):
    """Rewards so large that the gradient overflows to inf: every minibatch is skipped, no
    checkpoint is written, the rollouts go to the dropped stream, and the next batch trains."""
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    queue = trainer.queue
    queue.ensure_group()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for i in range(8):
        queue.add(rollout(trainer.tokenizer, version=0, reward=3e38 * (1 if i % 2 else -1), seed=i))
    assert trainer.step(trainer.collect(threading.Event())) is None
    assert committed_versions(trainer.config.run.checkpoint_dir) == [] and queue.latest_version()[0] == 0
    assert not published_dir(trainer.config.run).joinpath("v000001").exists()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    dropped = queue.redis.xrange(queue.dropped_stream)
    assert len(dropped) == 8 and {f[b"drop_reason"] for _, f in dropped} == {b"nonfinite"}
    assert trainer.metrics.nonfinite_skips._value.get() >= 1 and queue.pending_count() == 0
    for i in range(8):
        queue.add(rollout(trainer.tokenizer, version=0, reward=float(i % 3), seed=10 + i))
    assert trainer.step(trainer.collect(threading.Event())).version == 1


def test_a_batch_past_the_kl_hard_limit_rolls_the_policy_back_and_training_continues(tiny_lm_dir, redis_url, tmp_path):
    from services.common.models import load_causal_lm as load

    trainer = make_trainer(
        tiny_lm_dir, redis_url, tmp_path, kl_hard_limit=3.0, kl_coef=0.1, lr=1e-2, checkpoint_every_steps=1
    )
    queue = trainer.queue
    queue.ensure_group()

    def batch(version: int, logprob: float, seed: int):
        for i in range(8):
            item = rollout(trainer.tokenizer, version=version, reward=float(i % 3), seed=seed + i)
            item.logprobs = np.full(5, logprob, np.float32)  # reference at -5.2: KL = 5 * (logprob + 5.2)
            queue.add(item)
        return trainer.step(trainer.collect(threading.Event()))

    assert batch(0, -5.0, 0).version == 1  # KL 1.0 per response: fine
    rollback = batch(1, -1.0, 100)  # KL 21 per response: version 1 went too far
    assert rollback.event == "rollback" and rollback.rolled_back_to == 0 and rollback.version == 2
    assert trainer.kl_controller.value == pytest.approx(0.2)  # raise_beta, factor 2
    assert trainer.metrics.rollbacks._value.get() == 1
    trainer.persister.wait()  # a rollback persists at once: the restored weights and the raised β
    v1, v2 = (dict(committed_versions(trainer.config.run.checkpoint_dir))[v] for v in (1, 2))
    base = load(str(tiny_lm_dir), torch.device("cpu"), "base").state_dict()
    restored = load(str(v2), torch.device("cpu"), "v2").state_dict()
    moved = load(str(v1), torch.device("cpu"), "v1").state_dict()
    assert all(torch.equal(base[k], restored[k]) for k in base)  # version 2 serves the SFT weights again
    assert any(not torch.equal(base[k], moved[k]) for k in base)
    assert queue.latest_version()[0] == 2
    reasons = [f[b"drop_reason"] for _, f in queue.redis.xrange(queue.dropped_stream)]
    assert reasons == [b"kl_limit"] * 8
    assert batch(2, -5.0, 200).version == 3  # and training goes on from the restored weights


def test_the_kl_rail_can_lower_the_learning_rate_instead(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(
        tiny_lm_dir, redis_url, tmp_path, kl_hard_limit=3.0, kl_limit_action="lower_lr", kl_limit_factor=4.0, lr=1e-3
    )
    trainer.queue.ensure_group()
    for i in range(8):
        item = rollout(trainer.tokenizer, version=0, reward=float(i), seed=i)
        item.logprobs = np.full(5, -1.0, np.float32)
        trainer.queue.add(item)
    summary = trainer.step(trainer.collect(threading.Event()))
    assert summary.event == "rollback" and summary.lr == pytest.approx(1e-3 / 4)
    assert trainer.scheduler.base_lrs == [pytest.approx(1e-3 / 4)] * len(trainer.scheduler.base_lrs)


def test_each_step_reports_the_length_bias_and_diversity_of_its_responses(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    trainer.queue.ensure_group()
    texts = ["good good good good", "a b c d", "a b a b", "x y", "good good good good", "p q r", "s t", "u v w"]
    lengths, rewards = [], []
    for i, text in enumerate(texts):
        item = rollout(trainer.tokenizer, version=0, reward=float(i), seed=i)
        keep = 2 + i % 4  # responses of 2 to 5 tokens, so length and reward can correlate
        item.response_ids, item.logprobs, item.ref_logprobs = (
            item.response_ids[:keep],
            item.logprobs[:keep],
            item.ref_logprobs[:keep],
        )
        item.response_text = text
        lengths.append(len(item.response_ids))
        rewards.append(item.reward)
        trainer.queue.add(item)
    summary = trainer.step(trainer.collect(threading.Event()))
    bigrams = [tuple(t.split()[j : j + 2]) for t in texts for j in range(len(t.split()) - 1)]
    assert summary.stats.distinct_2 == pytest.approx(len(set(bigrams)) / len(bigrams))
    per_text = []
    for t in texts:
        grams = [tuple(t.split()[j : j + 3]) for j in range(len(t.split()) - 2)]
        per_text.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
    assert summary.stats.repetition_3 == pytest.approx(sum(per_text) / len(per_text))
    assert summary.stats.reward_length_correlation == pytest.approx(float(np.corrcoef(rewards, lengths)[0, 1]))
    assert summary.stats.reward_length_correlation != 0.0
    assert trainer.metrics.gauges["distinct_2"]._value.get() == pytest.approx(summary.stats.distinct_2)


def test_an_update_out_of_device_memory_keeps_its_batch_in_the_dropped_stream(
    tiny_lm_dir, redis_url, tmp_path, monkeypatch
):
    """The one mock here: the minibatch loss raises torch.OutOfMemoryError as a full card would (no
    GPU on this machine). Nothing is published, the 8 rollouts are in the dropped stream with reason
    out_of_memory and every field, and the next batch trains."""
    from services.trainer import update

    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    queue = trainer.queue
    queue.ensure_group()
    for i in range(8):
        queue.add(rollout(trainer.tokenizer, version=0, reward=float(i % 3), seed=i))
    real = update.minibatch_loss

    def full_card(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.92 GiB.")

    monkeypatch.setattr(update, "minibatch_loss", full_card)
    assert trainer.step(trainer.collect(threading.Event())) is None
    assert queue.latest_version()[0] == 0 and queue.pending_count() == 0
    dropped = queue.redis.xrange(queue.dropped_stream)
    assert len(dropped) == 8 and {f[b"drop_reason"] for _, f in dropped} == {b"out_of_memory"}
    assert all(b"response_ids" in f for _, f in dropped)  # the rollout itself, kept
    assert trainer.metrics.out_of_memory._value.get() == 1
    monkeypatch.setattr(update, "minibatch_loss", real)
    for i in range(8):
        queue.add(rollout(trainer.tokenizer, version=0, reward=float(i % 3), seed=10 + i))
    assert trainer.step(trainer.collect(threading.Event())).version == 1
