"""The sampler/trainer mismatch inside a real update (issue #14): measured against the trainer's
weights before the update, zero when the rollouts carry the trainer's own log-probs, positive when
the policy sampled in bfloat16; truncated importance sampling scales each token's loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.common.models import load_causal_lm, load_tokenizer
from services.policy.engine import PolicyEngine, Sampling
from services.trainer.batch import collate
from services.trainer.update import forward

from .conftest import make_config
from .test_trainer_options import PROMPTS, make_trainer, reference_dir, sample_rollouts  # noqa: F401 (a fixture)


def with_trainer_logprobs(trainer, rollouts):
    """The rollouts, their behaviour log-probs replaced by the trainer's own (no grad, same batch)."""
    data = collate(rollouts, trainer.tokenizer.pad_token_id, trainer.device)
    with torch.no_grad():
        logprobs = forward(trainer, data)[0]
    for row, rollout in enumerate(rollouts):
        where = data.response_mask[row].bool()
        rollout.logprobs = logprobs[row][where].numpy().astype(np.float32)
    return rollouts


def test_the_mismatch_is_zero_when_the_rollouts_carry_the_trainers_own_logprobs(
    tiny_lm_dir,
    reference_dir,  # noqa: F811
    tmp_path,
):
    trainer = make_trainer(tiny_lm_dir, tmp_path, measure_mismatch=True)
    stats = trainer.update(with_trainer_logprobs(trainer, sample_rollouts(tiny_lm_dir, reference_dir)))
    assert stats.logprob_mismatch_mean_abs == 0.0 and stats.logprob_mismatch_k3 == 0.0


def test_the_mismatch_is_positive_when_the_policy_sampled_in_bfloat16(tiny_lm_dir, reference_dir, tmp_path):  # noqa: F811
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir)
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    bf16 = PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy", torch.bfloat16), tokenizer, make_config().grpc
    )
    sampled = bf16.generate(PROMPTS, 2, Sampling(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=0))
    for rollout, prompt, response, logprobs in zip(
        rollouts, sampled.prompt_ids, sampled.response_ids, sampled.logprobs
    ):
        rollout.prompt_ids, rollout.response_ids = np.array(prompt), np.array(response)
        rollout.logprobs = np.array(logprobs, np.float32)
        rollout.ref_logprobs = np.zeros(len(response), np.float32)
    float32 = make_trainer(tiny_lm_dir, tmp_path / "a", measure_mismatch=True).update(
        sample_rollouts(tiny_lm_dir, reference_dir)
    )
    stats = make_trainer(tiny_lm_dir, tmp_path / "b", measure_mismatch=True).update(rollouts)
    assert stats.logprob_mismatch_mean_abs > 10 * float32.logprob_mismatch_mean_abs > 0
    assert stats.logprob_mismatch_k3 > float32.logprob_mismatch_k3 >= 0


def test_the_mismatch_is_not_measured_on_the_cpu_by_default(tiny_lm_dir, reference_dir, tmp_path):  # noqa: F811
    stats = make_trainer(tiny_lm_dir, tmp_path).update(sample_rollouts(tiny_lm_dir, reference_dir))
    assert math.isnan(stats.logprob_mismatch_mean_abs) and math.isnan(stats.logprob_mismatch_k3)


def test_truncated_importance_sampling_scales_the_loss_by_the_capped_weight(
    tiny_lm_dir,
    reference_dir,  # noqa: F811
    tmp_path,
):
    """One optimizer step over the whole batch: the trainer's ratio is exactly 1 under TIS, the sampler's
    behaviour log-probs agree with it to ~1e-6 on the CPU, so every weight is min(~1, cap) = cap and the
    loss is cap times the plain one."""
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir)
    plain = make_trainer(tiny_lm_dir, tmp_path / "a", minibatch_size=8).update(rollouts)
    capped = make_trainer(tiny_lm_dir, tmp_path / "b", minibatch_size=8, tis_cap=1e-3).update(rollouts)
    assert capped.optimizer_steps == plain.optimizer_steps == 1
    assert capped.loss == pytest.approx(1e-3 * plain.loss, rel=1e-3, abs=1e-9)
    assert capped.logprob_mismatch_mean_abs < 1e-4  # fp32 sampler and trainer: rounding only
