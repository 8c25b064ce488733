"""A CUDA out-of-memory during an update (issue #14). No GPU here, so the one mock in this file:
the minibatch loss raises torch.OutOfMemoryError, as the allocator does on a full card; the rest is
the real trainer on a real tiny model."""

from __future__ import annotations

import torch

from services.trainer import update

from .test_trainer_options import make_trainer, reference_dir, sample_rollouts  # noqa: F401 (a fixture)


def oom_after(calls: int, real):
    """minibatch_loss that raises torch.OutOfMemoryError from its (calls + 1)-th call on."""
    seen = []

    def loss(*args, **kwargs):
        seen.append(1)
        if len(seen) > calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.92 GiB.")
        return real(*args, **kwargs)

    return loss


def test_an_update_that_runs_out_of_memory_at_once_changes_nothing_and_says_so(
    tiny_lm_dir,
    reference_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
):
    trainer = make_trainer(tiny_lm_dir, tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    monkeypatch.setattr(update, "minibatch_loss", oom_after(0, update.minibatch_loss))
    stats = trainer.update(sample_rollouts(tiny_lm_dir, reference_dir))
    assert stats.out_of_memory and stats.optimizer_steps == 0
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert trainer.metrics.out_of_memory._value.get() == 1
    assert "CUDA out of memory in the update after 0 optimizer steps" in caplog.text
    assert "trainer.minibatch_size" in caplog.text


def test_an_update_cut_short_after_a_step_keeps_the_step_it_took(
    tiny_lm_dir,
    reference_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    trainer = make_trainer(tiny_lm_dir, tmp_path)  # 8 rollouts, minibatches of 4: two steps planned
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    monkeypatch.setattr(update, "minibatch_loss", oom_after(1, update.minibatch_loss))
    stats = trainer.update(sample_rollouts(tiny_lm_dir, reference_dir))
    assert stats.out_of_memory and stats.optimizer_steps == 1
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert all(p.grad is None for p in trainer.model.parameters())  # freed with the allocator's cache
