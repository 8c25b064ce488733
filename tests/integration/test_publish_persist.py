"""Publish every update, persist every few: the trainer, the policy engine and a real redis-server.

Resume equality with checkpoint_every_steps > 1, the old checkpoint format, the published files
the policy swaps to, pruning by what replicas serve, the actor's production bound, and the
persisted checkpoint as a plain Hugging Face model directory."""

from __future__ import annotations

import json
import pathlib
import threading

import numpy as np
import pytest
import redis
import torch
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM

from services.common.checkpoints import STATE_JSON, committed_versions, write_checksum_manifest
from services.common.models import load_causal_lm, load_tokenizer, weights_fingerprint
from services.common.published import published_dir
from services.common.rollout_queue import Rollout, RolloutQueue
from services.common.rpc import RequestError
from services.policy.engine import PolicyEngine
from services.policy.swaps import checked_weights_path
from services.trainer.trainer import Trainer
from services.trainer.trainer_metrics import TrainerMetrics

from .conftest import make_config


def rollout(tokenizer, version: int, seed: int) -> Rollout:
    rng = np.random.default_rng(seed)
    prompt = tokenizer("Tell me about your weekend.")["input_ids"]
    response = rng.integers(3, len(tokenizer), size=6).tolist()
    return Rollout(
        prompt_text="p",
        response_text="r",
        prompt_ids=np.array(prompt),
        response_ids=np.array(response),
        logprobs=rng.uniform(-6, -4, 6).astype(np.float32),
        ref_logprobs=np.full(6, -5.0, np.float32),
        reward=float(rng.normal()),
        policy_version=version,
        finish_reason="length",
        group_id=f"g{seed}",
        rollout_id=f"r{seed}",
    )


def make_trainer(model_dir, redis_url, tmp_path, run: str = "belay", **trainer) -> Trainer:
    config = make_config(
        run={"name": run, "checkpoint_dir": str(tmp_path / run / "checkpoints")},
        redis={"url": redis_url, "block_ms": 50, "claim_idle_ms": 1},
        trainer={
            "model_dir": str(model_dir),
            "batch_size": 8,
            "minibatch_size": 4,
            "lr": 5e-3,
            "ppo_epochs": 2,
            **trainer,
        },
    )
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    queue.ensure_group()
    model = load_causal_lm(str(model_dir), torch.device("cpu"), "trainer")
    return Trainer(config, model, load_tokenizer(str(model_dir)), queue, TrainerMetrics(CollectorRegistry()))


def feed(trainer: Trainer, batch: int, version: int) -> None:
    for i in range(8):
        trainer.queue.add(rollout(trainer.tokenizer, version, seed=100 * batch + i))


def train_one(trainer: Trainer) -> dict:
    return trainer.step(trainer.collect(threading.Event()))


def test_an_interrupted_run_resumed_from_its_last_persist_equals_the_uninterrupted_one(
    tiny_lm_dir, redis_url, tmp_path
):
    # Uninterrupted: four updates, a persist every two.
    whole = make_trainer(tiny_lm_dir, redis_url, tmp_path, run="whole", checkpoint_every_steps=2)
    whole.publish_at_start()
    for batch in range(4):
        feed(whole, batch, version=batch)
        train_one(whole)
    whole.finish()

    # Interrupted after the third update: persisted at 2, published 3, then the process is gone.
    first = make_trainer(tiny_lm_dir, redis_url, tmp_path, run="cut", checkpoint_every_steps=2)
    first.publish_at_start()
    for batch in range(3):
        feed(first, batch, version=batch)
        train_one(first)
    first.persister.wait()
    assert [v for v, _ in committed_versions(first.config.run.checkpoint_dir)] == [2]
    assert first.queue.pending_count() == 8 and first.queue.awaiting_persist() == 8  # batch 3: trained, unpersisted
    del first

    resumed = make_trainer(tiny_lm_dir, redis_url, tmp_path, run="cut", checkpoint_every_steps=2)
    assert resumed.resume() == 2
    resumed.publish_at_start()  # versions only grow: 2's weights go out again as version 4
    assert resumed.version == 4 and resumed.queue.latest_version()[0] == 4
    assert resumed.queue.awaiting_persist() == 0
    assert resumed.lineage.staleness(3) == 1  # orphan 3, one update down the dead branch: still trainable
    train_one(resumed)  # batch 3 again (redelivered: it was never acknowledged), sampled by 2: fresh
    assert resumed.lineage.staleness(3) == 2  # now two updates away along the path through 2: stale
    feed(resumed, 3, version=5)  # batch 4, sampled by the resumed lineage's newest version
    summary = train_one(resumed)
    assert summary.rollout_versions == [5] and resumed.version == 6
    resumed.finish()
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    final = committed_versions(resumed.config.run.checkpoint_dir)[-1][1]
    consumed = json.loads((final / STATE_JSON).read_text())["consumed_rollout_ids"]
    assert sorted(consumed) == sorted(f"r{100 * b + i}" for b in range(4) for i in range(8))  # each once
    assert resumed.queue.pending_count() == 0


def test_a_checkpoint_of_the_earlier_format_resumes_and_a_newer_one_is_refused(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    feed(trainer, 0, version=0)
    train_one(trainer)
    trainer.finish()
    path = committed_versions(trainer.config.run.checkpoint_dir)[-1][1]
    meta = json.loads((path / STATE_JSON).read_text())
    for key in ("format", "lineage"):  # what format 1 (a checkpoint per version) did not have
        del meta[key]
    (path / STATE_JSON).write_text(json.dumps(meta))
    write_checksum_manifest(path, 1)
    old = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    assert old.resume() == 1 and old.lineage.staleness(0) == 1 and old.lineage.staleness(1) == 0

    meta["format"] = 3
    (path / STATE_JSON).write_text(json.dumps(meta))
    write_checksum_manifest(path, 1)
    with pytest.raises(ValueError, match="format 3 by a newer Belay"):
        make_trainer(tiny_lm_dir, redis_url, tmp_path).resume()


def test_the_policy_swaps_to_published_weights_and_only_from_its_own_directories(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    feed(trainer, 0, version=0)
    train_one(trainer)
    version, path = trainer.queue.latest_version()
    config = trainer.config
    engine = PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"),
        load_tokenizer(str(tiny_lm_dir)),
        config.grpc,
    )
    engine.swap_to(version, checked_weights_path(config.run, version, path))
    assert weights_fingerprint(engine.loaded.model) == weights_fingerprint(trainer.model)
    elsewhere = tmp_path / "elsewhere" / "v000001"
    elsewhere.mkdir(parents=True)
    with pytest.raises(RequestError, match="not inside the policy's checkpoint directory"):
        checked_weights_path(config.run, 1, str(elsewhere))
    link = published_dir(config.run) / "v000009"
    link.symlink_to(elsewhere)
    with pytest.raises(RequestError, match="not inside"):
        checked_weights_path(config.run, 9, str(link))


def test_published_versions_go_once_no_live_replica_serves_them(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    queue, root = trainer.queue, published_dir(trainer.config.run)
    queue.report_serving("replica-a", 0, "127.0.0.1:1", "file")
    for batch in range(3):
        feed(trainer, batch, version=batch)
        train_one(trainer)
    assert [p.name for p in sorted(root.glob("v*"))] == ["v000001", "v000002", "v000003"]  # a still serves 0
    queue.report_serving("replica-a", 2, "127.0.0.1:1", "file")
    queue.report_serving("replica-b", 3, "127.0.0.1:2", "file")
    feed(trainer, 3, version=3)
    train_one(trainer)
    assert [p.name for p in sorted(root.glob("v*"))] == ["v000002", "v000003", "v000004"]
    for replica in ("replica-a", "replica-b"):
        queue.report_serving(replica, 4, "127.0.0.1:1", "file")
    trainer.finish()  # the final version is persisted and served everywhere: the published copies go
    assert not root.exists()


def test_the_actor_bound_leaves_out_rollouts_awaiting_their_persist(tiny_lm_dir, redis_url, tmp_path):
    from services.policy.actor import Actor
    from services.policy.policy_metrics import PolicyMetrics
    from services.policy.swaps import SwapRequests

    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path, max_staleness=1)
    config = trainer.config.model_copy(
        update={
            "policy": trainer.config.policy.model_copy(
                update={"canary_prompts_file": "", "prompts_per_batch": 4, "samples_per_prompt": 2}
            )
        }
    )
    engine = PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"),
        load_tokenizer(str(tiny_lm_dir)),
        config.grpc,
    )
    actor = Actor(config, engine, trainer.queue, None, None, SwapRequests(), PolicyMetrics(CollectorRegistry()))
    for batch in range(3):  # three updates, none persisted: 24 rollouts pending, all awaiting
        feed(trainer, batch, version=batch)
        train_one(trainer)
    actor.take_new_weights()
    assert engine.version == 3 and trainer.queue.pending_count() == 24
    assert actor.fresh_enough()  # counting pending ones as outstanding would say 3 batches ahead: wait forever
    feed(trainer, 3, version=3)
    assert actor.fresh_enough()  # one batch unread: sampling the next now is trained one version late
    feed(trainer, 4, version=3)
    assert not actor.fresh_enough()  # two unread: the next would be stale by 2


def test_a_persisted_checkpoint_is_a_plain_hugging_face_model_directory(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    feed(trainer, 0, version=0)
    train_one(trainer)
    trainer.finish()
    path = committed_versions(trainer.config.run.checkpoint_dir)[-1][1]
    loaded = AutoModelForCausalLM.from_pretrained(str(path))
    assert weights_fingerprint(loaded) == weights_fingerprint(trainer.model)
    assert load_tokenizer(str(path)).get_vocab() == trainer.tokenizer.get_vocab()


def test_persist_cadence_by_steps_or_seconds_and_its_gauges(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path, checkpoint_every_steps=3, checkpoint_every_seconds=3600)
    persisted = []
    for batch in range(4):
        feed(trainer, batch, version=batch)
        summary = train_one(trainer)
        trainer.persister.wait()
        persisted.append([v for v, _ in committed_versions(trainer.config.run.checkpoint_dir)])
        assert summary.seconds.persist > 0 if batch == 2 else summary.seconds.persist == 0
    assert persisted == [[], [], [3], [3]]
    read = lambda gauge: gauge.collect()[0].samples[0].value  # noqa: E731 - what a scrape reads
    assert read(trainer.metrics.updates_since_persist) == 1 and read(trainer.metrics.persisted_version) == 3
    assert 0 < read(trainer.metrics.seconds_since_persist) < 600
    trainer.persister.every_seconds = 0.0  # seconds since the last persist now past the cadence
    feed(trainer, 4, version=4)
    train_one(trainer)
    trainer.persister.wait()
    assert [v for v, _ in committed_versions(trainer.config.run.checkpoint_dir)][-1] == 5


def test_lora_publishes_the_adapter_tensors_only_and_the_policy_takes_them(tiny_lm_dir, redis_url, tmp_path):
    from services.common.lora import adapter_tensors, lora_settings, wrap_with_lora

    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    trainer.config.lora.enabled = True
    trainer = Trainer(
        trainer.config,
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "t"),
        trainer.tokenizer,
        trainer.queue,
        TrainerMetrics(CollectorRegistry()),
    )
    feed(trainer, 0, version=0)
    summary = train_one(trainer)
    version, path = trainer.queue.latest_version()
    files = sorted(p.name for p in pathlib.Path(path).iterdir())
    assert files == ["MANIFEST.json", "adapter_config.json", "adapter_model.safetensors"]
    adapters = adapter_tensors(trainer.model)
    assert summary.publish_bytes < sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())
    policy_model = wrap_with_lora(
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"), lora_settings(trainer.config.lora)
    )
    engine = PolicyEngine(policy_model, trainer.tokenizer, trainer.config.grpc)
    engine.swap_to(version, checked_weights_path(trainer.config.run, version, path))
    served = adapter_tensors(engine.loaded.model)
    assert set(served) == set(adapters) and all(torch.equal(served[k], adapters[k]) for k in adapters)
    assert any(t.abs().sum() > 0 for name, t in served.items() if "lora_B" in name)  # the update reached it


def test_a_new_trainer_never_serves_what_an_earlier_run_left_in_the_publish_directory(tiny_lm_dir, redis_url, tmp_path):
    first = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    feed(first, 0, version=0)
    train_one(first)  # leaves v000001 in the publish directory (killed: no finish)
    stale = published_dir(first.config.run) / "v000001" / "model.safetensors"
    before = stale.read_bytes()
    first.queue.redis.flushdb()  # the run started afresh: version numbers begin at 1 again
    second = make_trainer(tiny_lm_dir, redis_url, tmp_path, lr=1e-2)
    assert not stale.exists()  # an earlier run's version is gone before anything is announced
    feed(second, 0, version=0)
    train_one(second)
    version, path = second.queue.latest_version()
    assert version == 1 and (pathlib.Path(path) / "model.safetensors").read_bytes() != before
