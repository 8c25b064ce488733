"""The memory plan: parameter counts against real models, each item against its formula written
out again here, the per-device verdict (a refusal that names the biggest item, a plan that fits),
and `belay up` refusing before it starts anything."""

from __future__ import annotations

import json
import pathlib
import types

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from services.common import memory_check
from services.common.config import BelayConfig
from services.common.memory_check import cap_process_memory, config_plans, plan_device, read_shape
from services.common.memory_plan import (
    CUDA_CONTEXT_BYTES,
    GIB,
    device_verdicts,
    kv_cache_bytes,
    memory_fraction,
    model_shape,
    parameter_count,
    policy_plan,
    refusal,
    render_plan,
    trainer_plan,
)

QWEN25_15B = dict(
    model_type="qwen2",
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    tie_word_embeddings=True,
)
QWEN25_05B = dict(QWEN25_15B, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, intermediate_size=4864)
H200_BYTES = 150_000_000_000  # about what torch reports for an H200's 141 GB (139.7 GiB)
TINY = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def saved_shape(model: torch.nn.Module, directory: pathlib.Path, classifier: bool = False):
    """The shape as the plan reads it: from the config.json transformers writes."""
    model.config.save_pretrained(directory)
    return read_shape(str(directory), classifier)


def real_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())  # a tied weight is counted once


def test_qwen25_15b_shape_counts_its_published_parameters():
    assert parameter_count(model_shape(QWEN25_15B)) == 1_543_714_304
    assert parameter_count(model_shape(QWEN25_05B)) == 494_032_768
    with torch.device("meta"):  # the real module tree, no memory
        model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in QWEN25_15B.items() if k != "model_type"}))
    assert real_count(model) == 1_543_714_304


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=True),
        dict(tie_word_embeddings=False),
        dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        dict(tie_word_embeddings=True, num_key_value_heads=4, head_dim=16),
    ],
)
def test_parameter_count_equals_a_tiny_llama(tmp_path, overrides):
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    assert parameter_count(saved_shape(model, tmp_path)) == real_count(model)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_equals_a_tiny_qwen2_with_its_qkv_biases(tmp_path, tied):
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=tied))
    shape = saved_shape(model, tmp_path)
    assert shape.qkv_bias and not shape.output_bias
    assert parameter_count(shape) == real_count(model)


def test_parameter_count_equals_a_tiny_qwen3_with_its_qk_norms(tmp_path):
    model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=True))
    assert parameter_count(saved_shape(model, tmp_path)) == real_count(model)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_parameter_count_equals_a_tiny_reward_classifier(tmp_path, family):
    if family == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=1))
    else:
        model = Qwen2ForSequenceClassification(Qwen2Config(**TINY, num_labels=1))
    assert parameter_count(saved_shape(model, tmp_path, classifier=True)) == real_count(model)


def test_kv_cache_bytes_equal_the_cache_a_tiny_model_builds():
    config = LlamaConfig(**TINY, head_dim=16)  # d = 16, not h / a = 8
    model = LlamaForCausalLM(config).eval()
    rows, tokens = 3, 7
    with torch.no_grad():
        cache = model(torch.zeros(rows, tokens, dtype=torch.long), use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    tensors = (
        [t for layer in layers for t in (layer.keys, layer.values)] if layers else cache.key_cache + cache.value_cache
    )
    measured = sum(t.numel() * t.element_size() for t in tensors)
    shape = model_shape(config.to_dict())
    assert kv_cache_bytes(shape, rows, tokens, 4) == measured
    # written out: keys and values, per layer, g heads of d, per row and token, 4 bytes
    assert measured == 2 * 2 * 2 * 16 * rows * tokens * 4


def test_policy_plan_items_follow_their_formulas():
    shape = model_shape(QWEN25_15B)
    rows, prompt, new = 256, 1024, 512
    plan = policy_plan(shape, 2, rows, prompt, new, "cuda:0")
    items = {item.name: item.bytes for item in plan.items}
    assert items["policy weights"] == 1_543_714_304 * 2
    assert items["policy KV cache"] == 2 * 28 * 2 * 128 * rows * (prompt + new) * 2  # 28 layers, 2 kv heads of 128
    assert items["policy logits per step"] == rows * 151936 * 4
    assert items["policy prefill activations"] == rows * prompt * 1536 * 34
    assert items["CUDA context (assumed)"] == CUDA_CONTEXT_BYTES
    assert plan.total_bytes == sum(items.values())
    assert "policy KV cache" in render_plan(plan) and "total" in render_plan(plan)


def test_trainer_plan_items_follow_their_formulas():
    shape, parameters = model_shape(QWEN25_15B), 1_543_714_304
    tokens = 8 * 1152
    plain = {i.name: i.bytes for i in trainer_plan(shape, 2, tokens, False, tokens, 0, "cpu").items}
    assert plain["trainer float32 master weights"] == plain["trainer gradients"] == 4 * parameters
    assert plain["trainer AdamW moments"] == 8 * parameters
    assert plain["trainer serving copy"] == 2 * parameters
    assert plain["trainer activations"] == tokens * 1536 * 28 * 34  # 34 bytes per layer at 2-byte precision
    assert plain["trainer log-prob chunk"] == tokens * 151936 * 4 * 4  # logits, log-softmax, softmax, gradient
    assert "trainer full-batch log-probs (GAE or full KL)" not in plain  # 0 bytes: left out
    checkpointed = {i.name: i.bytes for i in trainer_plan(shape, 4, tokens, True, 1024, 0, "cpu").items}
    assert checkpointed["trainer activations"] == tokens * 1536 * 34 * 2 + 28 * tokens * 1536 * 4
    assert checkpointed["trainer log-prob chunk"] == 1024 * 151936 * 4 * 4
    assert "trainer serving copy" not in checkpointed  # float32 training serves its master weights


def test_an_fsdp_ranks_plan_holds_its_shard_and_what_fsdp2_gathers_whole():
    shape, parameters = model_shape(QWEN25_15B), 1_543_714_304
    tokens = 8 * 1152
    one = {i.name: i.bytes for i in trainer_plan(shape, 4, tokens, True, 1024, 0, "cuda:0").items}
    two = {i.name: i.bytes for i in trainer_plan(shape, 4, tokens, True, 1024, 0, "cuda:0", shards=2).items}
    assert "trainer FSDP2 gathered root and two blocks" not in one
    assert two["trainer float32 master weights (1/2 per rank)"] == 4 * parameters // 2
    assert two["trainer gradients (1/2 per rank)"] == 4 * parameters // 2
    assert two["trainer AdamW moments (1/2 per rank)"] == 8 * parameters // 2
    # Qwen2.5-1.5B, written out: tied embeddings V*h plus the final norm h; a block is attention with
    # q/k/v biases (12 heads and 2 KV heads of 128) + the 3-matrix MLP + two norms
    h, intermediate, vocab = 1536, 8960, 151936
    block = (h * 12 * 128 + 2 * h * 2 * 128 + 12 * 128 * h) + (12 * 128 + 2 * 2 * 128) + 3 * h * intermediate + 2 * h
    assert two["trainer FSDP2 gathered root and two blocks"] == 4 * (vocab * h + h + 2 * block)
    bf16 = {i.name: i.bytes for i in trainer_plan(shape, 2, tokens, True, 1024, 0, "cuda:0", shards=2).items}
    assert bf16["trainer FSDP2 gathered root and two blocks"] == 2 * (vocab * h + h + 2 * block)  # gathered in bf16
    assert vocab * h + h + 28 * block == parameters  # the split adds up to the whole model
    weights_grads_moments = ("master weights", "gradients", "AdamW moments")
    ones = sum(b for n, b in one.items() if any(w in n for w in weights_grads_moments))
    twos = sum(b for n, b in two.items() if any(w in n for w in weights_grads_moments))
    assert twos / ones == 0.5  # issue #15: at most 60 % per rank at 2 ranks


def test_the_trainers_plan_is_sharded_only_under_fsdp_with_more_than_one_rank(monkeypatch):
    from services.common.memory_check import fsdp_ranks

    section = types.SimpleNamespace(parallelism="fsdp")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert fsdp_ranks(section) == 4
    assert fsdp_ranks(types.SimpleNamespace(parallelism="ddp")) == 1  # every ddp rank holds a whole copy
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fsdp_ranks(section) == 1


def write_model_configs(directory: pathlib.Path, shape: dict) -> tuple[str, str]:
    """config.json of a causal LM and of a one-logit classifier of that shape (no weights: none are read)."""
    settings = {k: v for k, v in shape.items() if k != "model_type"}
    (directory / "lm").mkdir()
    (directory / "rm").mkdir()
    Qwen2Config(**settings).save_pretrained(directory / "lm")
    Qwen2Config(**settings, num_labels=1).save_pretrained(directory / "rm")
    return str(directory / "lm"), str(directory / "rm")


def four_services(tmp_path, shape=QWEN25_15B, device="cuda:0", **trainer) -> BelayConfig:
    lm, rm = write_model_configs(tmp_path, shape)
    return BelayConfig.model_validate(
        {
            "policy": {"model_dir": lm, "device": device, "prompts_per_batch": 4, "samples_per_prompt": 2},
            "reference": {"model_dir": lm, "device": device},
            "reward": {"backend": "hf_classifier", "model_dir": rm, "device": device},
            "trainer": {"model_dir": lm, "device": device, "batch_size": 8, "minibatch_size": 8, **trainer},
        }
    )


def test_four_services_on_a_16_gib_device_are_refused_naming_the_biggest_item(tmp_path):
    plans, notes = config_plans(four_services(tmp_path), cuda_available=True)
    assert not notes and [p.service for p in plans] == ["policy", "reference", "reward", "trainer"]
    [verdict] = device_verdicts(plans, {"cuda:0": 16 * GIB})
    assert not verdict.fits
    # minibatch 8 rows of 1024 prompt + 128 new tokens; 1536 hidden, 28 layers, 34 bytes per layer
    activations = 8 * (1024 + 128) * 1536 * 28 * 34
    assert verdict.biggest().name == "trainer activations" and verdict.biggest().bytes == activations
    message = refusal([verdict])
    assert (
        f"trainer activations {activations / 2**30:.1f} GiB is the biggest item: "
        "lower trainer.minibatch_size or set trainer.gradient_checkpointing: true" in message
    )
    assert "of 16.0 GiB" in message and "DOES NOT FIT" in message


def test_four_services_of_the_05b_shape_fit_an_h200_and_share_it(tmp_path):
    plans, _ = config_plans(four_services(tmp_path, QWEN25_05B), cuda_available=True)
    [verdict] = device_verdicts(plans, {"cuda:0": H200_BYTES})
    assert verdict.fits and refusal([verdict]) is None
    fractions = [memory_fraction(verdict, service) for service in ("policy", "reference", "reward", "trainer")]
    assert sum(fractions) == pytest.approx(1.0) and max(fractions) == memory_fraction(verdict, "trainer")


def test_cpu_plans_are_logged_but_never_checked(tmp_path):
    plans, _ = config_plans(four_services(tmp_path, device="auto"), cuda_available=False)
    [verdict] = device_verdicts(plans, {"cuda:0": 1})
    assert verdict.device == "cpu" and verdict.fits and "not checked" in verdict.message()
    assert all(item.name != "CUDA context (assumed)" for plan in plans for item in plan.items)


def test_devices_resolve_as_the_services_do():
    assert plan_device("auto", True) == plan_device("cuda", False) == "cuda:0"
    assert plan_device("auto", False) == "cpu" and plan_device("cuda:1", True) == "cuda:1"


def test_a_missing_model_config_is_a_note_not_a_failure(tmp_path):
    config = four_services(tmp_path)
    config.trainer.model_dir = str(tmp_path / "nowhere")
    plans, notes = config_plans(config, cuda_available=True)
    assert [p.service for p in plans] == ["policy", "reference", "reward"]
    assert len(notes) == 1 and notes[0].startswith("trainer: no memory plan")


def test_gradient_checkpointing_and_the_prompt_limit_shrink_their_items(tmp_path):
    config = four_services(tmp_path)
    plain = {i.name: i.bytes for p in config_plans(config, True)[0] for i in p.items}
    config.trainer.gradient_checkpointing = True
    config.policy.max_prompt_tokens = 256
    changed = {i.name: i.bytes for p in config_plans(config, True)[0] for i in p.items}
    assert changed["trainer activations"] < plain["trainer activations"] / 10
    assert changed["policy KV cache"] == plain["policy KV cache"] * (256 + 128) // (1024 + 128)


def test_belay_up_refuses_a_plan_that_does_not_fit_before_starting_anything(tmp_path, monkeypatch):
    from services import launcher

    monkeypatch.setattr(memory_check, "probe_cuda_capacities", lambda: {"cuda:0": 16 * GIB})
    monkeypatch.setattr(launcher.LocalStack, "start", lambda *_: pytest.fail("started a service"))
    lines = []
    with pytest.raises(launcher.StackError, match="trainer activations .* is the biggest item"):
        launcher.up(four_services(tmp_path), tmp_path / "run", 1, 10, say=lines.append)
    assert lines[0].startswith("memory plan:")


def test_the_launchers_check_accepts_a_plan_that_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_check, "probe_cuda_capacities", lambda: {"cuda:0": H200_BYTES})
    report, refused = memory_check.memory_check(four_services(tmp_path, QWEN25_05B))
    assert refused is None and "cuda:0: plan" in report and ": fits" in report


def test_cap_process_memory_is_a_no_op_on_cpu():
    cap_process_memory("cpu", 0.5)
    cap_process_memory("cuda:0", None)


def test_the_config_json_transformers_writes_round_trips(tmp_path):
    Qwen2Config(**{k: v for k, v in QWEN25_15B.items() if k != "model_type"}).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    assert read_shape(str(tmp_path)) == model_shape(QWEN25_15B)
    with pytest.raises(FileNotFoundError):
        read_shape(str(tmp_path / "absent"))
