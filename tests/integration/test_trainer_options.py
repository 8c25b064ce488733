"""The trainer's update with each toolbox option, on rollouts sampled by a real tiny policy and
scored against a real (differently initialised) reference; no Redis needed for update()."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from services.common.models import (
    freeze,
    load_causal_lm,
    load_tokenizer,
    response_logprobs,
    response_logprobs_with_top_k,
)
from services.common.rollout_queue import Rollout, RolloutQueue
from services.policy.engine import PolicyEngine, Sampling
from services.trainer import update
from services.trainer.batch import collate
from services.trainer.masking import masked_mean
from services.trainer.trainer import Trainer
from services.trainer.trainer_metrics import TrainerMetrics
from tests.tiny_models import build_causal_lm

from .conftest import make_config

PROMPTS = ["Tell me about your weekend.", "How are you feeling today?", "Describe a walk in the park.", "Hi"]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return build_causal_lm(tmp_path_factory.mktemp("reference"), seed=5)  # same tokenizer, other weights


def sample_rollouts(policy_dir, reference_dir, top_k: int = 0, seed: int = 0) -> list[Rollout]:
    """8 fresh rollouts (4 prompts x 2 samples) at version 0 with behaviour and reference logprobs."""
    tokenizer = load_tokenizer(str(policy_dir))
    engine = PolicyEngine(load_causal_lm(str(policy_dir), torch.device("cpu"), "policy"), tokenizer, make_config().grpc)
    batch = engine.generate(PROMPTS, 2, Sampling(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=seed))
    reference = freeze(load_causal_lm(str(reference_dir), torch.device("cpu"), "reference"))
    pad = tokenizer.pad_token_id
    if top_k:
        ref_rows, top_rows = response_logprobs_with_top_k(reference, batch.prompt_ids, batch.response_ids, pad, top_k)
    else:
        ref_rows, top_rows = response_logprobs(reference, batch.prompt_ids, batch.response_ids, pad), None
    rollouts = []
    for row in range(len(batch.response_ids)):
        extra = {}
        if top_k:
            extra = {
                "ref_top_ids": top_rows[row][0].numpy().reshape(-1).astype(np.int32),
                "ref_top_logprobs": top_rows[row][1].numpy().reshape(-1),
            }
        rollouts.append(
            Rollout(
                prompt_text=PROMPTS[batch.prompt_index[row]],
                response_text=batch.texts[row],
                prompt_ids=np.array(batch.prompt_ids[row]),
                response_ids=np.array(batch.response_ids[row]),
                logprobs=np.array(batch.logprobs[row], np.float32),
                ref_logprobs=ref_rows[row].numpy(),
                reward=float(row % 3) - 1.0 + 0.1 * row,
                policy_version=0,
                finish_reason=batch.finish_reasons[row],
                group_id=f"prompt-{batch.prompt_index[row]}",
                group_size=2,
                **extra,
            )
        )
    return rollouts


def make_trainer(model_dir, tmp_path, lora: dict | None = None, policy: dict | None = None, **trainer) -> Trainer:
    settings = {"model_dir": str(model_dir), "batch_size": 8, "minibatch_size": 4, "lr": 1e-3, **trainer}
    config = make_config(
        run={"checkpoint_dir": str(tmp_path / "checkpoints")},
        trainer=settings,
        policy={"samples_per_prompt": 2, **(policy or {})},
        lora=lora or {},
    )
    model = load_causal_lm(str(model_dir), torch.device("cpu"), "trainer")
    return Trainer(config, model, load_tokenizer(str(model_dir)), None, TrainerMetrics(CollectorRegistry()))


OPTIONS = [
    {},  # the seed's recipe
    {"advantage": "group"},
    {"advantage": "group", "group_scale_by_std": True},
    {"advantage": "rloo"},
    {"advantage": "gae", "lam": 0.9, "gamma": 0.99},
    {"whiten_advantages": True},
    {"kl_estimator": "k2"},
    {"kl_estimator": "k3", "kl_placement": "loss"},
    {"kl_controller": "adaptive", "kl_target": 1.0, "kl_horizon": 100},
    {"loss_aggregation": "sequence_mean", "reward_normalize": True, "reward_clip": 1.0},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "seed")
def test_first_minibatch_ratio_is_one_on_fresh_rollouts_and_the_update_moves_the_policy(
    options, tiny_lm_dir, reference_dir, tmp_path
):
    trainer = make_trainer(tiny_lm_dir, tmp_path, **options)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    summary = trainer.update(sample_rollouts(tiny_lm_dir, reference_dir))
    assert summary.first_minibatch_max_log_ratio < 1e-5
    assert summary.optimizer_steps == 2 and summary.skipped_minibatches == 0
    assert math.isfinite(summary.loss) and summary.kl_per_sequence != 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    if options.get("advantage") == "gae":
        assert math.isfinite(summary.value_loss)


def test_exact_kl_from_full_rows_equals_the_sum_over_the_vocabulary(tiny_lm_dir, reference_dir, tmp_path):
    vocabulary = len(load_tokenizer(str(tiny_lm_dir)))
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir, top_k=vocabulary)
    trainer = make_trainer(tiny_lm_dir, tmp_path, kl_estimator="full")
    # the exact KL per response, computed here from both models' full distributions
    policy = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "p").eval()
    reference = load_causal_lm(str(reference_dir), torch.device("cpu"), "r").eval()
    expected = []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([list(r.prompt_ids) + list(r.response_ids)])
            p = torch.log_softmax(policy(ids).logits[0, :-1].float(), -1)[len(r.prompt_ids) - 1 :]
            q = torch.log_softmax(reference(ids).logits[0, :-1].float(), -1)[len(r.prompt_ids) - 1 :]
            expected.append(float((p.exp() * (p - q)).sum()))
    summary = trainer.update(rollouts)
    assert summary.kl_per_sequence == pytest.approx(float(np.mean(expected)), rel=1e-4)
    assert summary.first_minibatch_max_log_ratio < 1e-5


def test_top_k_rows_give_a_kl_close_to_but_not_the_exact_one(tiny_lm_dir, reference_dir, tmp_path):
    vocabulary = len(load_tokenizer(str(tiny_lm_dir)))
    exact = (
        make_trainer(tiny_lm_dir, tmp_path / "a", kl_estimator="full")
        .update(sample_rollouts(tiny_lm_dir, reference_dir, top_k=vocabulary))
        .kl_per_sequence
    )
    truncated = (
        make_trainer(tiny_lm_dir, tmp_path / "b", kl_estimator="full")
        .update(sample_rollouts(tiny_lm_dir, reference_dir, top_k=16))
        .kl_per_sequence
    )
    assert truncated != pytest.approx(exact, rel=1e-6)
    assert truncated > 0


def test_early_stop_ends_the_update_once_approx_kl_passes_the_target(tiny_lm_dir, reference_dir, tmp_path):
    trainer = make_trainer(tiny_lm_dir, tmp_path, ppo_epochs=4, early_stop_kl=1e-9)
    summary = trainer.update(sample_rollouts(tiny_lm_dir, reference_dir))
    assert summary.early_stopped is True
    assert summary.optimizer_steps < 8  # 4 epochs x 2 minibatches without the stop


def test_adaptive_beta_follows_ziegler_and_warm_up_sets_the_learning_rate(tiny_lm_dir, reference_dir, tmp_path):
    trainer = make_trainer(
        tiny_lm_dir, tmp_path, kl_controller="adaptive", kl_coef=0.1, kl_target=0.5, kl_horizon=64, warmup_steps=4
    )
    summary = trainer.update(sample_rollouts(tiny_lm_dir, reference_dir))
    error = min(max(summary.kl_per_sequence / 0.5 - 1, -0.2), 0.2)
    assert summary.kl_coef_next == pytest.approx(0.1 * (1 + error * 8 / 64))
    assert summary.lr == pytest.approx(1e-3 * 3 / 4)  # after 2 optimizer steps of a 4-step warm-up


def test_shaped_reward_is_normalised_clipped_length_normalised_then_penalised(tiny_lm_dir, reference_dir, tmp_path):
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir)
    trainer = make_trainer(
        tiny_lm_dir, tmp_path, reward_normalize=True, reward_clip=0.8, length_normalize=True, truncation_penalty=0.3
    )
    raw = np.array([r.reward for r in rollouts])
    shaped = np.clip((raw - raw.mean()) / raw.std(), -0.8, 0.8) / np.array([len(r.response_ids) for r in rollouts])
    shaped -= 0.3 * np.array([r.finish_reason == "length" for r in rollouts])
    assert trainer.update(rollouts).shaped_reward_mean == pytest.approx(shaped.mean(), rel=1e-5)


def test_overlong_penalty_uses_the_policys_response_cap_after_the_truncation_penalty(
    tiny_lm_dir, reference_dir, tmp_path
):
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir)  # max_new_tokens=10
    trainer = make_trainer(
        tiny_lm_dir,
        tmp_path,
        truncation_penalty=0.3,
        overlong_penalty=0.4,
        overlong_band_tokens=6,
        policy={"max_new_tokens": 12},  # a cap above the sampler's 10: lengths fall inside the band, not past it
    )
    raw = np.array([r.reward for r in rollouts])
    lengths = np.array([len(r.response_ids) for r in rollouts])
    # DAPO, eq. 13: (L_max - L_cache - |y|) / L_cache inside the band, 0 before it
    soft = np.where(lengths <= 12 - 6, 0.0, np.maximum((12 - 6 - lengths) / 6, -1.0))
    shaped = raw - 0.3 * np.array([r.finish_reason == "length" for r in rollouts]) + 0.4 * soft
    assert -1 < soft.min() < 0  # some response is inside the band
    assert trainer.update(rollouts).shaped_reward_mean == pytest.approx(shaped.mean(), rel=1e-5)


def mean_entropy(trainer: Trainer, rollouts) -> float:
    """The policy's mean entropy per response token on `rollouts`, nats."""
    data = collate(rollouts, trainer.tokenizer.pad_token_id, trainer.device)
    with torch.no_grad():
        _, entropy, _, _ = update.forward(trainer, data)
    return float(masked_mean(entropy, data.response_mask))


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_an_entropy_bonus_alone_raises_the_policys_entropy(tiny_lm_dir, reference_dir, tmp_path, aggregation):
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir)
    for rollout in rollouts:  # one reward for all and no KL: every advantage is 0, the clipped loss has no gradient
        rollout.reward = 1.0
    options = dict(kl_coef=0.0, loss_aggregation=aggregation)
    still = make_trainer(tiny_lm_dir, tmp_path, **options)
    before = mean_entropy(still, rollouts)
    summary = still.update(rollouts)
    assert summary.optimizer_steps == 2 and summary.loss == 0.0
    assert mean_entropy(still, rollouts) == before  # no bonus: no gradient, no step moved a weight
    bonus = make_trainer(tiny_lm_dir, tmp_path, entropy_coef=0.5, **options)
    summary = bonus.update(rollouts)
    if aggregation == "token_mean":  # loss = 0 − c · (mean entropy per response token), minibatch by minibatch
        assert summary.loss == pytest.approx(-0.5 * summary.entropy, rel=1e-5)
    assert mean_entropy(bonus, rollouts) > before + 1e-4


def test_resume_restores_critic_beta_reward_moments_schedule_and_weights(tiny_lm_dir, reference_dir, tmp_path):
    options = dict(advantage="gae", kl_controller="adaptive", reward_normalize=True, warmup_steps=10)
    trainer = make_trainer(tiny_lm_dir, tmp_path, **options)
    trainer.update(sample_rollouts(tiny_lm_dir, reference_dir))
    trainer.save(1, ["a"])
    resumed = make_trainer(tiny_lm_dir, tmp_path, **options)
    assert resumed.resume() == 1
    assert torch.equal(resumed.value_head.linear.weight, trainer.value_head.linear.weight)
    assert resumed.kl_controller.value == trainer.kl_controller.value != 0.05
    assert resumed.reward_moments.state_dict() == trainer.reward_moments.state_dict()
    assert resumed.scheduler.last_epoch == trainer.scheduler.last_epoch == 2
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)


def test_lora_trainer_trains_adapters_only_and_checkpoints_carry_only_them(tiny_lm_dir, reference_dir, tmp_path):
    trainer = make_trainer(tiny_lm_dir, tmp_path, lora={"enabled": True, "r": 4, "alpha": 8})
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    summary = trainer.update(sample_rollouts(tiny_lm_dir, reference_dir))
    assert summary.optimizer_steps == 2
    for name, parameter in trainer.model.named_parameters():
        if name in base:
            assert torch.equal(parameter, base[name]), f"base weight {name} moved"
    path = trainer.save(1, [])
    files = {p.name for p in path.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    resumed = make_trainer(tiny_lm_dir, tmp_path, lora={"enabled": True, "r": 4, "alpha": 8})
    resumed.resume()
    for (name, a), b in zip(resumed.model.named_parameters(), trainer.model.parameters()):
        assert torch.equal(a, b), name


def test_group_baselines_train_on_whole_groups_only(tiny_lm_dir, redis_url, tmp_path):
    config = make_config(
        run={"checkpoint_dir": str(tmp_path / "c")},
        redis={"url": redis_url, "block_ms": 50},
        policy={"samples_per_prompt": 2},
        trainer={"model_dir": str(tiny_lm_dir), "batch_size": 4, "minibatch_size": 4, "advantage": "rloo"},
    )
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    trainer = Trainer(
        config,
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "t"),
        load_tokenizer(str(tiny_lm_dir)),
        queue,
        TrainerMetrics(CollectorRegistry()),
    )
    queue.ensure_group()

    def add(group: str) -> None:
        queue.add(
            Rollout(
                prompt_text="p",
                response_text="r",
                prompt_ids=np.array([5, 6]),
                response_ids=np.array([7]),
                logprobs=np.array([-1.0], np.float32),
                ref_logprobs=np.array([-1.0], np.float32),
                reward=0.0,
                policy_version=0,
                finish_reason="eos",
                group_id=group,
                group_size=2,
            )
        )

    for group in ["A", "B", "A", "C", "C", "B"]:
        add(group)
    batch = trainer.collect(threading.Event())
    groups = sorted(r.group_id for _, r in batch)
    assert len(groups) == 4 and groups[0] == groups[1] and groups[2] == groups[3] != groups[0]
    (waiting,) = trainer.intake.partial_groups  # the third whole group did not fit: it waits, still pending
    assert {waiting, *groups} == {"A", "B", "C"} and len(trainer.intake.partial_groups[waiting]) == 2
    add("D")
    add("E")
    add("D")
    second = sorted(r.group_id for _, r in trainer.collect(threading.Event()))
    assert second == sorted([waiting, waiting, "D", "D"])  # E is incomplete: never trained on half a group
    assert queue.pending_count() == 9


def test_interrupted_and_resumed_training_equals_an_uninterrupted_run(tiny_lm_dir, reference_dir, tmp_path):
    """CPU, same seed: 2 updates, checkpoint, a new trainer process state resumed, 2 more updates ==
    4 updates in one go, bit for bit (optimizer, scheduler, KL controller, normaliser, critic, RNG)."""
    batches = [sample_rollouts(tiny_lm_dir, reference_dir, seed=s) for s in range(4)]
    options = dict(
        advantage="gae",
        kl_controller="adaptive",
        reward_normalize=True,
        warmup_steps=3,
        lr_schedule="cosine",
        ppo_epochs=2,
    )
    straight = make_trainer(tiny_lm_dir, tmp_path / "straight", **options)
    for batch in batches:
        straight.update(batch)
    interrupted = make_trainer(tiny_lm_dir, tmp_path / "resumed", **options)
    for batch in batches[:2]:
        interrupted.update(batch)
    interrupted.save(2, [])
    del interrupted
    resumed = make_trainer(tiny_lm_dir, tmp_path / "resumed", **options)
    assert resumed.resume() == 2
    for batch in batches[2:]:
        resumed.update(batch)
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.value_head.linear.weight, resumed.value_head.linear.weight)
    assert straight.kl_controller.value == resumed.kl_controller.value


def test_the_run_manifest_records_config_packages_fingerprints_seeds_and_revision(tiny_lm_dir, tmp_path):
    import json

    from services.common.models import weights_fingerprint

    trainer = make_trainer(tiny_lm_dir, tmp_path, seed=7)
    manifest = json.loads(trainer.write_run_manifest().read_text())
    assert manifest["config"]["trainer"]["seed"] == 7 and manifest["seeds"] == {"trainer": 7, "policy": 0}
    assert manifest["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert manifest["fingerprints"]["policy_start"] == weights_fingerprint(trainer.model)
    assert manifest["git_revision"] and len(manifest["git_revision"].split("+")[0]) == 40


def test_two_runs_with_the_same_seed_make_the_same_first_update(tiny_lm_dir, reference_dir, tmp_path):
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir, seed=3)
    first, second = (make_trainer(tiny_lm_dir, tmp_path / name, seed=11, ppo_epochs=2) for name in ("a", "b"))
    first.update(rollouts)
    second.update(rollouts)
    for (name, a), b in zip(first.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name
