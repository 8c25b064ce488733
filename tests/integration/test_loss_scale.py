"""Dynamic loss scaling in a float16 trainer (services/trainer/loss_scale.py, issue #14), on rollouts
sampled by the real tiny policy: gradients float16 flushes to zero train with it; an overflow halves
the scale and skips the step outside the NaN rail; a NaN loss stays the rail's; the scale persists."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.common.checkpoints import load_trainer_state
from services.trainer.loss_scale import LossScale

from .test_trainer_options import make_trainer, reference_dir, sample_rollouts  # noqa: F401 (a fixture)

# Rewards times 1e-7: per-token gradients of ~1e-9 at the logits, under float16's smallest subnormal (6e-8).
UNDERFLOWING = 1e-7


def scaled_rewards(rollouts, factor: float):
    return [dataclasses.replace(r, reward=r.reward * factor) for r in rollouts]


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def moved(trainer, before: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]


def sample(trainer, name: str) -> float:
    return trainer.metrics.registry.get_sample_value(name)


def test_float16_gradients_that_underflow_unscaled_train_with_the_loss_scale(
    tiny_lm_dir,
    reference_dir,  # noqa: F811
    tmp_path,
):
    """kl_coef 0 and no weight decay: only the reward's gradient can move a weight. AdamW is scale
    invariant, so moving at all is the signal; the unscaled gradient norm must match float32's."""
    rollouts = scaled_rewards(sample_rollouts(tiny_lm_dir, reference_dir), UNDERFLOWING)
    settings = {"kl_coef": 0.0, "weight_decay": 0.0}
    exact = make_trainer(tiny_lm_dir, tmp_path / "f32", dtype="float32", **settings).update(rollouts)
    unscaled = make_trainer(tiny_lm_dir, tmp_path / "off", dtype="float16", **settings)
    unscaled.loss_scale = LossScale(enabled=False)
    before = weights(unscaled)
    summary = unscaled.update(rollouts)
    assert summary.optimizer_steps == 2 and summary.grad_norm == 0.0 and moved(unscaled, before) == []
    scaled = make_trainer(tiny_lm_dir, tmp_path / "on", dtype="float16", **settings)
    assert scaled.loss_scale.enabled and scaled.loss_scale.scale == 2.0**16
    summary = scaled.update(rollouts)
    assert summary.optimizer_steps == 2 and summary.skipped_minibatches == 0
    assert len(moved(scaled, before)) == len(before), "a weight did not move"
    assert summary.grad_norm == pytest.approx(exact.grad_norm, rel=1e-2)  # float16's precision, not 2^16 off
    assert scaled.loss_scale.good_steps == 2 and sample(scaled, "belay_trainer_loss_scale") == 2.0**16


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_other_dtypes_scale_nothing(tiny_lm_dir, tmp_path, dtype):
    trainer = make_trainer(tiny_lm_dir, tmp_path, dtype=dtype)
    assert not trainer.loss_scale.enabled and sample(trainer, "belay_trainer_loss_scale") == 1.0


def test_an_overflow_halves_the_scale_and_skips_the_step_outside_the_nan_rail(
    tiny_lm_dir,
    reference_dir,  # noqa: F811
    tmp_path,
):
    """At S = 2^40 the scaled gradients pass float16's 65504: each minibatch halves S and skips."""
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir)
    trainer = make_trainer(tiny_lm_dir, tmp_path, dtype="float16")
    trainer.loss_scale.scale = 2.0**40
    before = weights(trainer)
    summary = trainer.update(rollouts)
    assert summary.optimizer_steps == 0 and summary.skipped_minibatches == 2 and moved(trainer, before) == []
    assert trainer.loss_scale.scale == 2.0**38 and trainer.loss_scale.overflows == 2
    assert trainer.metrics.nonfinite_skips._value.get() == 0
    assert sample(trainer, "belay_trainer_loss_scale_overflows_total") == 2
    assert sample(trainer, "belay_trainer_loss_scale") == 2.0**38
    trainer.loss_scale.scale = 2.0**8  # settled: the same batch now steps
    assert trainer.update(rollouts).optimizer_steps == 2 and len(moved(trainer, before)) == len(before)


def test_a_nan_loss_in_float16_is_the_nan_rails_and_leaves_the_scale(tiny_lm_dir, reference_dir, tmp_path):  # noqa: F811
    rollouts = scaled_rewards(sample_rollouts(tiny_lm_dir, reference_dir), float("nan"))
    trainer = make_trainer(tiny_lm_dir, tmp_path, dtype="float16")
    summary = trainer.update(rollouts)
    assert summary.optimizer_steps == 0 and trainer.metrics.nonfinite_skips._value.get() == 2
    assert trainer.loss_scale.scale == 2.0**16 and trainer.loss_scale.overflows == 0


def test_the_loss_scale_survives_a_persist_and_resume(tiny_lm_dir, reference_dir, tmp_path):  # noqa: F811
    trainer = make_trainer(tiny_lm_dir, tmp_path, dtype="float16")
    trainer.loss_scale.scale = 2.0**9
    trainer.update(sample_rollouts(tiny_lm_dir, reference_dir))
    path = trainer.save(1, [])
    _, meta = load_trainer_state(path)
    assert meta["loss_scale"] == {"enabled": True, "scale": 2.0**9, "good_steps": 2}
    resumed = make_trainer(tiny_lm_dir, tmp_path, dtype="float16")
    assert resumed.resume() == 1
    assert (resumed.loss_scale.scale, resumed.loss_scale.good_steps) == (2.0**9, 2)
    assert sample(resumed, "belay_trainer_loss_scale") == 2.0**9
    other = make_trainer(tiny_lm_dir, tmp_path, dtype="bfloat16")  # the same checkpoint, another dtype
    assert other.resume() == 1 and not other.loss_scale.enabled and other.loss_scale.scale == 1.0
