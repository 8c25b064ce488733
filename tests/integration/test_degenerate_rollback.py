"""trainer.rollback_on_degenerate: the trainer reads the policy's canary verdicts from the review
store in Redis and, when a version's canary answers are degenerate, rolls back as the KL rail does,
to the newest persisted version whose verdict is in and clean (the SFT model when none is)."""

from __future__ import annotations

import threading

import torch

from services.common.checkpoints import committed_versions, load_trainer_state
from services.common.models import load_causal_lm
from services.common.review_store import ReviewStore
from services.common.step_records import StepRecord

from .test_trainer_queue import make_trainer, rollout


def train_batch(trainer, version: int, seed: int):
    for i in range(8):
        trainer.queue.add(rollout(trainer.tokenizer, version=version, reward=float(i % 3), seed=seed + i))
    return trainer.step(trainer.collect(threading.Event()))


def weights(path) -> dict[str, torch.Tensor]:
    return load_causal_lm(str(path), torch.device("cpu"), str(path)).state_dict()


def test_a_degenerate_version_rolls_back_to_the_newest_persisted_clean_one(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(
        tiny_lm_dir,
        redis_url,
        tmp_path,
        rollback_on_degenerate=True,
        lr=1e-2,
        checkpoint_every_steps=1,
        keep_checkpoints=10,
    )
    trainer.queue.ensure_group()
    store = ReviewStore(trainer.queue.redis, trainer.config.run.name)
    store.record_canaries(0, {"degenerate": []})
    assert [train_batch(trainer, v, 10 * v).version for v in (0, 1, 2)] == [1, 2, 3]
    store.record_canaries(1, {"degenerate": []})
    # version 2's verdict is not in yet: it cannot be the target; version 3's answers loop
    store.record_canaries(3, {"degenerate": [0, 2]})
    rollback = train_batch(trainer, 3, 100)
    assert rollback.event == "rollback" and rollback.cause == "canary_degenerate"
    assert (rollback.degenerate_version, rollback.rolled_back_to, rollback.version) == (3, 1, 4)
    assert trainer.kl_controller.value == trainer.config.trainer.kl_coef * trainer.config.trainer.kl_limit_factor
    trainer.persister.wait()
    checkpoints = dict(committed_versions(trainer.config.run.checkpoint_dir))
    v1, v4 = weights(checkpoints[1]), weights(checkpoints[4])
    assert all(torch.equal(v1[k], v4[k]) for k in v1)  # version 4 serves version 1's weights again
    assert trainer.queue.latest_version()[0] == 4
    reasons = [f[b"drop_reason"] for _, f in trainer.queue.redis.xrange(trainer.queue.dropped_stream)]
    assert reasons == [b"canary_degenerate"] * 8
    assert load_trainer_state(checkpoints[4])[1]["rolled_back_at"] == 4  # a resumed trainer does not redo it
    # Verdicts on versions the rollback left behind arrive late and change nothing; training goes on.
    store.record_canaries(2, {"degenerate": [1]})
    assert isinstance(train_batch(trainer, 4, 200), StepRecord)
    # A version of the new branch that degenerates rolls back again, to the clean version 1 (4 and 5
    # have no verdict).
    store.record_canaries(5, {"degenerate": [1]})
    again = train_batch(trainer, 5, 300)
    assert (again.event, again.degenerate_version, again.rolled_back_to, again.version) == ("rollback", 5, 1, 6)


def test_degenerate_canaries_do_not_roll_back_unless_asked(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path)
    assert trainer.config.trainer.rollback_on_degenerate is False
    trainer.queue.ensure_group()
    assert train_batch(trainer, 0, 0).version == 1
    ReviewStore(trainer.queue.redis, trainer.config.run.name).record_canaries(1, {"degenerate": [0]})
    assert isinstance(train_batch(trainer, 1, 10), StepRecord)
