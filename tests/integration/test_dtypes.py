"""The dtype settings (issue #14) end to end on the CPU, which runs bfloat16 and float16 too: the
services load their models in the asked dtype, the trainer keeps float32 master weights and AdamW
state and runs its forward passes under autocast, and the policy is published in its own dtype."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.config_section import resolve_attention
from services.common.models import load_section_model, resolve_dtype
from services.trainer.publishing import Publisher, serving_tensors

from .conftest import make_config
from .test_trainer_options import make_trainer, reference_dir, sample_rollouts  # noqa: F401 (a fixture)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bfloat16_on_cuda_and_float32_on_the_cpu():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", CUDA) == torch.bfloat16
    assert resolve_dtype("float16", CPU) == torch.float16
    with pytest.raises(ValueError, match="'int8' is not one of auto"):
        resolve_dtype("int8", CPU)


def test_auto_attention_is_sdpa_without_flash_attn():
    assert resolve_attention("auto", CPU) == "sdpa"
    assert resolve_attention("eager", CUDA) == "eager"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_service_loads_its_model_in_the_asked_dtype(tiny_lm_dir, dtype):
    section = make_config(reference={"model_dir": str(tiny_lm_dir), "dtype": dtype}).reference
    model = load_section_model(section, "reference.model_dir")
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_trainer_updates_float32_master_weights_under_autocast(tiny_lm_dir, reference_dir, tmp_path, dtype):  # noqa: F811
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir)
    trainer = make_trainer(tiny_lm_dir, tmp_path, dtype=dtype)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    summary = trainer.update(rollouts)
    assert trainer.compute_dtype == getattr(torch, dtype)
    assert summary.optimizer_steps == 2 and summary.skipped_minibatches == 0
    assert math.isfinite(summary.loss)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    moments = [state["exp_avg"] for state in trainer.optimizer.state.values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert changed, "no weight moved"


def test_the_trainer_under_autocast_computes_what_the_float32_one_does_to_its_precision(
    tiny_lm_dir,
    reference_dir,  # noqa: F811
    tmp_path,
):
    """The same batch through a float32 and a bfloat16 trainer: the policy log-probs agree to
    bfloat16's precision (an 8-bit mantissa: ~1e-2 relative), not bit for bit."""
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir)
    full = make_trainer(tiny_lm_dir, tmp_path / "a", dtype="float32")
    half = make_trainer(tiny_lm_dir, tmp_path / "b", dtype="bfloat16")
    from services.trainer.batch import collate
    from services.trainer.update import forward

    data = collate(rollouts, full.tokenizer.pad_token_id, full.device)
    with torch.no_grad():
        exact, _, _, _ = forward(full, data)
        autocast, _, _, _ = forward(half, data)
    mask = data.response_mask.bool()
    gap = (exact - autocast)[mask].abs()
    assert 0 < gap.max() < 0.1, gap.max()


@pytest.mark.parametrize(("policy_dtype", "expected"), [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_weights_are_published_in_the_policys_dtype(tiny_lm_dir, tmp_path, policy_dtype, expected):
    config = make_config(
        run={"checkpoint_dir": str(tmp_path / "c"), "publish_dir": str(tmp_path / "p")},
        policy={"dtype": policy_dtype},
    )
    publisher = Publisher(config, queue=None, policy=None, transport=None)
    assert publisher.serving_dtype == expected
    model = load_section_model(make_config(reference={"model_dir": str(tiny_lm_dir)}).reference, "m")
    tensors = serving_tensors(model, False, publisher.serving_dtype)
    assert {t.dtype for t in tensors.values()} == {expected}
    live = serving_tensors(model, False)
    assert all(live[k].data_ptr() == p.data_ptr() for k, p in model.state_dict().items() if k in live)


def test_gradient_checkpointing_trains_to_the_same_weights(tiny_lm_dir, reference_dir, tmp_path):  # noqa: F811
    """trainer.gradient_checkpointing recomputes activations in backward: the same update, to float rounding."""
    rollouts = sample_rollouts(tiny_lm_dir, reference_dir)
    plain = make_trainer(tiny_lm_dir, tmp_path / "a")
    recomputing = make_trainer(tiny_lm_dir, tmp_path / "b", gradient_checkpointing=True)
    assert recomputing.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    plain.update(rollouts)
    recomputing.update(rollouts)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), recomputing.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
