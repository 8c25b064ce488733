"""TensorBoard event files (services/trainer/tensorboard_log.py), read back with tensorboard's own
EventAccumulator: a real trainer step against a real redis-server, typed step and rollback records,
canary records with whatever numeric fields the policy adds, and failures that never stop training."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading

import pytest
import redis
import torch
from prometheus_client import CollectorRegistry
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from services.common.models import load_causal_lm, load_tokenizer
from services.common.review_store import ReviewStore
from services.common.rollout_queue import RolloutQueue
from services.common.step_records import RollbackRecord, UpdateStats
from services.trainer.tensorboard_log import TensorBoardLog
from services.trainer.trainer import Trainer
from services.trainer.trainer_metrics import TrainerMetrics
from tests.step_records import make_step_record

from .conftest import make_config
from .test_trainer_queue import rollout


def read_events(directory) -> EventAccumulator:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalar_points(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(point.step, point.value) for point in events.Scalars(tag)]


def texts(events: EventAccumulator, tag: str) -> dict[int, str]:
    """add_text's tag `tag` reads back as the tensor `tag`/text_summary: step -> the text."""
    return {
        event.step: tensor_util.make_ndarray(event.tensor_proto).item().decode()
        for event in events.Tensors(f"{tag}/text_summary")
    }


def canary(prompts: list[str], outputs: list[str], **numbers) -> dict:
    return {"time": 1000.0, "prompts": prompts, "outputs": outputs, "output_ids": [[1, 2]] * len(prompts), **numbers}


def tensorboard_log(tmp_path, redis_url, run: str) -> tuple[TensorBoardLog, ReviewStore]:
    config = make_config(run={"name": run, "tensorboard_dir": str(tmp_path / "tb")})
    store = ReviewStore(redis.Redis.from_url(redis_url), run)
    return TensorBoardLog.from_config(config, store), store


def test_a_trainer_step_writes_every_figure_and_the_canary_answers_at_their_versions(tiny_lm_dir, redis_url, tmp_path):
    config = make_config(
        run={
            "name": "stepped",
            "checkpoint_dir": str(tmp_path / "checkpoints"),
            "tensorboard_dir": str(tmp_path / "tb"),
        },
        redis={"url": redis_url, "block_ms": 50},
        trainer={"model_dir": str(tiny_lm_dir), "batch_size": 8, "minibatch_size": 4},
    )
    model = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "trainer")
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    trainer = Trainer(config, model, load_tokenizer(str(tiny_lm_dir)), queue, TrainerMetrics(CollectorRegistry()))
    trainer.review.record_canaries(0, canary(["Say hi."], ["hello | there\n# not a heading"], drift=0.0))
    trainer.queue.ensure_group()
    for i in range(8):
        trainer.queue.add(rollout(trainer.tokenizer, version=0, reward=float(i % 3), seed=i))
    record = trainer.step(trainer.collect(threading.Event()))
    trainer.finish()

    events = read_events(tmp_path / "tb" / trainer.config.run.name)
    for field in dataclasses.fields(UpdateStats):
        value = float(getattr(record.stats, field.name))
        if value == value:  # NaN figures (not measured) are left out
            assert scalar_points(events, f"update/{field.name}") == [(1, pytest.approx(value, rel=1e-6))]
    assert scalar_points(events, "seconds/update") == [(1, pytest.approx(record.seconds.update, rel=1e-6))]
    assert scalar_points(events, "run/rollouts") == [(1, 8.0)]
    assert "update/logprob_mismatch_k3" not in events.Tags()["scalars"]  # NaN on CPU: not measured
    assert texts(events, "canaries/answers")[0].count("    hello | there\n    # not a heading") == 1
    assert scalar_points(events, "canaries/drift") == [(0, 0.0)]
    assert 1 in texts(events, "sample")


def test_typed_records_and_canaries_with_any_numeric_fields_read_back(redis_url, tmp_path):
    log, store = tensorboard_log(tmp_path, redis_url, "records")
    log.write_step(make_step_record(3, time=500.0, seconds={"publish": 0.25}, loss=-0.5, entropy=2.0))
    log.write_rollback(RollbackRecord(version=4, rolled_back_to=2, batch_kl=9.5, kl_coef=0.1, lr=1e-6, time=600.0))
    # another helper's per-canary signals: a top-level number, a per-prompt list, a nested dict
    store.record_canaries(
        3, canary(["a?", "b?"], ["A.", "B."], drift=0.25, repetition=[0.5, 0.0], relevance={"mean": 0.75})
    )
    signals = [{"relevance": 0.5, "degenerate": False}, {"relevance": 0.125, "degenerate": True}]
    store.record_canaries(4, canary(["a?", "b?"], ["A!", "B!"], drift=0.5, signals=signals, degenerate=[1]))
    log.write_new_canaries(3)  # the first check: versions 2 and 3
    log.write_new_canaries(5)  # versions 4 and 5 (5 has no record yet)
    store.record_canaries(5, canary(["a?", "b?"], ["A5", "B5"], drift=0.75))
    log.write_new_canaries(5)  # 5 now, and not 3 or 4 again
    log.close()

    events = read_events(tmp_path / "tb" / "records")
    assert scalar_points(events, "update/loss") == [(3, -0.5)]
    assert scalar_points(events, "update/entropy") == [(3, 2.0)]
    assert scalar_points(events, "update/early_stopped") == [(3, 0.0)]
    assert scalar_points(events, "seconds/publish") == [(3, 0.25)]
    assert events.Scalars("update/loss")[0].wall_time == 500.0
    assert scalar_points(events, "rollback/batch_kl") == [(4, 9.5)]
    assert scalar_points(events, "rollback/rolled_back_to") == [(4, 2.0)]
    assert scalar_points(events, "canaries/drift") == [(3, 0.25), (4, 0.5), (5, 0.75)]
    assert scalar_points(events, "canaries/repetition/prompt_0") == [(3, 0.5)]
    assert scalar_points(events, "canaries/repetition/prompt_1") == [(3, 0.0)]
    assert scalar_points(events, "canaries/relevance/mean") == [(3, 0.75)]
    # the policy's canary record: signals one dict per prompt, degenerate the indices flagged
    assert scalar_points(events, "canaries/signals/relevance/prompt_1") == [(4, 0.125)]
    assert scalar_points(events, "canaries/signals/degenerate/prompt_0") == [(4, 0.0)]
    assert scalar_points(events, "canaries/degenerate_count") == [(4, 1.0)]
    answers = texts(events, "canaries/answers")
    assert sorted(answers) == [3, 4, 5]
    assert "**prompt 1**\n\n    b?\n\n**answer**\n\n    B!" in answers[4]
    assert not [tag for tag in events.Tags()["scalars"] if "output_ids" in tag or tag.endswith("/time")]


def test_off_by_default_and_a_failure_to_write_is_one_warning_never_an_exception(redis_url, tmp_path, caplog):
    assert TensorBoardLog.from_config(make_config(), None) is None
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING):
        assert TensorBoardLog.from_config(make_config(run={"tensorboard_dir": str(blocked)}), None) is None
    assert "TensorBoard event files off" in caplog.text

    with socket.socket() as probe:  # a port nobody listens on: Redis away
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    log, _ = tensorboard_log(tmp_path, f"redis://127.0.0.1:{dead_port}/0", "away")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        log.write_new_canaries(1)
        log.write_new_canaries(2)
        log.write_step(make_step_record(2, loss=1.0))  # the step's scalars still land
    assert caplog.text.count("TensorBoard: could not write") == 1
    log.close()
    assert scalar_points(read_events(tmp_path / "tb" / "away"), "update/loss") == [(2, 1.0)]
