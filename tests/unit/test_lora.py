"""LoRA adapters (services/common/lora.py) on a real tiny Llama: only adapters train, the wrapped
model starts equal to the base, an adapter saved as safetensors hot-swaps into a fresh wrapped
copy of the base exactly, and misfit adapters are refused before anything is copied."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from services.common.checkpoints import load_weights_into, write_checkpoint
from services.common.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraSettings,
    adapter_tensors,
    is_adapter_checkpoint,
    load_adapter_into,
    save_adapter,
    wrap_with_lora,
)
from services.common.models import load_causal_lm
from services.common.token_logprobs import model_response_stats
from tests.pickle_trap import trap_bytes

CPU = torch.device("cpu")
TEXTS = ["I love this, it is good and happy and great.", "How are you feeling today?"]


def load_base(model_dir: pathlib.Path):
    return load_causal_lm(str(model_dir), CPU, "base").eval()


def wrapped(model_dir: pathlib.Path, settings: LoraSettings | None = None) -> PeftModel:
    return wrap_with_lora(load_base(model_dir), settings or LoraSettings()).eval()


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def base_weights(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's own weights inside a wrapped model, under the plain model's key names."""
    return {
        name.replace(".base_layer", ""): tensor
        for name, tensor in peft_model.get_base_model().state_dict().items()
        if "lora_" not in name
    }


def snapshot(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in adapter_tensors(peft_model).items()}


def train_steps(peft_model: PeftModel, batch, steps: int = 5, lr: float = 1e-2) -> None:
    """A few AdamW steps raising the mean log-prob of the batch's tokens (only adapters are optimised)."""
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    for _ in range(steps):
        mask = batch["attention_mask"][:, 1:].float()
        stats, _ = model_response_stats(peft_model, batch["input_ids"], batch["attention_mask"], mask, 1.0, 64)
        loss = -(stats.logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.eval()


def randomise_lora_b(peft_model: PeftModel, seed: int) -> None:
    """Give an adapter nonzero B so that loading it would visibly change the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    return tiny_tokenizer(TEXTS, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def trained(tiny_lm_dir, batch, tmp_path_factory):
    """A wrapped model after a few training steps, and its adapter saved to a directory."""
    torch.manual_seed(123)
    model = wrapped(tiny_lm_dir)
    train_steps(model, batch)
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(model, directory)
    return model, directory


@pytest.fixture
def loaded(tiny_lm_dir, trained):
    """A fresh wrapped copy of the base carrying the trained adapter (its logits are not the base's)."""
    model = wrapped(tiny_lm_dir)
    load_adapter_into(model, trained[1])
    return model


def test_only_lora_parameters_train_and_their_count_matches_the_formula(tiny_lm_dir):
    settings = LoraSettings(r=8)
    model = wrapped(tiny_lm_dir, settings)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert frozen and not any("lora_" in name for name in frozen)
    # Every frozen parameter is a base weight (embeddings, norms, MLP, attention base_layer).
    assert any("q_proj.base_layer.weight" in name for name in frozen)
    assert any("mlp.gate_proj.weight" in name for name in frozen)

    config = model.get_base_model().config
    hidden = config.hidden_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    r = settings.r
    # r * (in + out) per target module: q (h -> h), k (h -> kv), v (h -> kv), o (h -> h).
    per_layer = r * (hidden + hidden) + r * (hidden + kv) + r * (hidden + kv) + r * (hidden + hidden)
    expected = per_layer * config.num_hidden_layers
    assert expected == 3584  # the tiny Llama: h=32, kv=16, 2 layers: 2 * 8 * (64 + 48 + 48 + 64)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert len(trainable) == 2 * len(settings.target_modules) * config.num_hidden_layers


def test_the_wrapped_model_equals_the_base_at_initialisation(tiny_lm_dir, batch):
    base = load_base(tiny_lm_dir)
    model = wrapped(tiny_lm_dir)
    lora_b = [t for name, t in adapter_tensors(model).items() if "lora_B" in name]
    lora_a = [t for name, t in adapter_tensors(model).items() if "lora_A" in name]
    assert lora_b and all(torch.count_nonzero(t) == 0 for t in lora_b)
    assert lora_a and all(torch.count_nonzero(t) > 0 for t in lora_a)  # A is random; B = 0 makes BA = 0
    assert torch.equal(logits(model, batch), logits(base, batch))


def test_a_saved_adapter_hot_swaps_into_a_fresh_wrapped_base(tiny_lm_dir, batch, trained):
    model, directory = trained
    base = load_base(tiny_lm_dir)
    fresh = wrapped(tiny_lm_dir)
    assert torch.equal(logits(fresh, batch), logits(base, batch))
    pointers = {name: p.data_ptr() for name, p in fresh.named_parameters()}

    load_adapter_into(fresh, directory)

    expected = logits(model, batch)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-6, rtol=0)
    assert (expected - logits(base, batch)).abs().max() > 1e-2  # training did move the policy
    assert {name: p.data_ptr() for name, p in fresh.named_parameters()} == pointers  # copied in place
    for name, tensor in adapter_tensors(fresh).items():
        assert torch.equal(tensor, adapter_tensors(model)[name]), name
    # Neither training nor loading touched a base weight: both equal a freshly loaded base.
    reference = base.state_dict()
    for peft_model in (model, fresh):
        weights = base_weights(peft_model)
        assert weights.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(weights[name], tensor), name


def test_the_adapter_checkpoint_is_two_small_files_in_the_standard_peft_layout(tiny_lm_dir, trained):
    model, directory = trained
    assert sorted(p.name for p in directory.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert not list(directory.glob("*.bin")) and not list(directory.glob("*.pt"))

    saved = load_file(directory / ADAPTER_WEIGHTS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in saved.values()) == trainable  # adapter weights only, nothing of the base
    assert all(t.dtype == torch.float32 for t in saved.values())
    # PEFT's on-disk keys carry no adapter name: ...q_proj.lora_A.weight, not ...lora_A.default.weight.
    assert all(k.startswith("base_model.model.model.layers.") for k in saved)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and ".default" not in k for k in saved)

    adapter_bytes = (directory / ADAPTER_WEIGHTS).stat().st_size
    model_bytes = sum(p.stat().st_size for p in tiny_lm_dir.glob("*.safetensors"))
    assert 4 * trainable <= adapter_bytes <= 4 * trainable + 4096  # fp32 adapter + a small header
    # 3584 adapter vs ~29k base parameters (h=32 is tiny, so the embeddings do not dominate): ~0.14.
    assert adapter_bytes / model_bytes < 0.2, adapter_bytes / model_bytes

    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 8, 16)
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_peft_itself_loads_the_saved_adapter(tiny_lm_dir, batch, trained):
    """The layout is PEFT's own: PeftModel.from_pretrained reads it (from safetensors) identically."""
    model, directory = trained
    other = PeftModel.from_pretrained(load_base(tiny_lm_dir), str(directory))
    torch.testing.assert_close(logits(other, batch), logits(model, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "settings, message",
    [
        (LoraSettings(r=16), "adapter r is 16, the model's adapter has 8"),
        (LoraSettings(alpha=32), "adapter lora_alpha is 32, the model's adapter has 16"),
        (LoraSettings(target_modules=("q_proj", "v_proj")), "adapter target_modules is ['q_proj', 'v_proj']"),
    ],
)
def test_an_adapter_with_other_settings_is_refused_and_nothing_changes(
    tiny_lm_dir, batch, loaded, tmp_path, settings, message
):
    other = wrapped(tiny_lm_dir, settings)
    randomise_lora_b(other, seed=7)
    save_adapter(other, tmp_path)
    before_logits, before_adapter = logits(loaded, batch), snapshot(loaded)

    with pytest.raises(ValueError, match=re.escape(message)):
        load_adapter_into(loaded, tmp_path)

    assert torch.equal(logits(loaded, batch), before_logits)
    assert all(torch.equal(t, before_adapter[name]) for name, t in adapter_tensors(loaded).items())


def test_a_rank_16_adapter_whose_config_claims_rank_8_is_refused_by_shape(tiny_lm_dir, batch, loaded, tmp_path):
    other = wrapped(tiny_lm_dir, LoraSettings(r=16))
    randomise_lora_b(other, seed=8)
    save_adapter(other, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 8}))
    before = logits(loaded, batch)

    with pytest.raises(ValueError, match=r"wrong shape.*lora_A\.weight: checkpoint \(16, 32\), model \(8, 32\)"):
        load_adapter_into(loaded, tmp_path)
    assert torch.equal(logits(loaded, batch), before)


def test_other_target_modules_whose_config_claims_a_fit_are_refused_by_key(tiny_lm_dir, batch, loaded, tmp_path):
    other = wrapped(tiny_lm_dir, LoraSettings(target_modules=("q_proj", "v_proj", "up_proj")))
    randomise_lora_b(other, seed=9)
    save_adapter(other, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(
        json.dumps({**config, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    )
    before = logits(loaded, batch)

    with pytest.raises(ValueError, match=r"unexpected keys \[.*up_proj.*missing keys \[.*k_proj"):
        load_adapter_into(loaded, tmp_path)
    assert torch.equal(logits(loaded, batch), before)


@pytest.mark.parametrize("fault", ["one_bad_shape", "one_missing_key", "one_extra_key"])
def test_one_misfit_tensor_among_good_ones_copies_nothing(tiny_lm_dir, batch, loaded, trained, tmp_path, fault):
    """Every key and shape is checked before the first copy: no half-loaded adapter."""
    state = {name: tensor + 1.0 for name, tensor in load_file(trained[1] / ADAPTER_WEIGHTS).items()}
    last = sorted(state)[-1]
    if fault == "one_bad_shape":
        state[last] = torch.zeros(state[last].shape[0], state[last].shape[1] + 1)
    elif fault == "one_missing_key":
        del state[last]
    else:
        state[last.replace("layers.1", "layers.7")] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / ADAPTER_WEIGHTS))
    (tmp_path / ADAPTER_CONFIG).write_text((trained[1] / ADAPTER_CONFIG).read_text())
    before_logits, before_adapter = logits(loaded, batch), snapshot(loaded)

    with pytest.raises(ValueError, match="layers"):
        load_adapter_into(loaded, tmp_path)

    assert torch.equal(logits(loaded, batch), before_logits)
    assert all(torch.equal(t, before_adapter[name]) for name, t in adapter_tensors(loaded).items())


def test_a_pickled_adapter_is_never_loaded(tiny_lm_dir, trained, tmp_path):
    marker = tmp_path / "pwned"

    only_pickle = tmp_path / "only_pickle"
    only_pickle.mkdir()
    (only_pickle / ADAPTER_CONFIG).write_text((trained[1] / ADAPTER_CONFIG).read_text())
    (only_pickle / "adapter_model.bin").write_bytes(trap_bytes(marker))
    with pytest.raises(FileNotFoundError, match=ADAPTER_WEIGHTS):
        load_adapter_into(wrapped(tiny_lm_dir), only_pickle)

    beside = tmp_path / "beside"
    save_adapter(trained[0], beside)
    (beside / "adapter_model.bin").write_bytes(trap_bytes(marker))
    load_adapter_into(wrapped(tiny_lm_dir), beside)
    assert not marker.exists()


def test_adapter_checkpoints_commit_atomically_and_are_told_apart_from_full_ones(tiny_lm_dir, batch, trained, tmp_path):
    model, _ = trained
    committed = write_checkpoint(tmp_path, 3, lambda directory: save_adapter(model, directory))
    assert committed.name == "v000003"
    assert is_adapter_checkpoint(committed)
    assert not is_adapter_checkpoint(tiny_lm_dir)
    with pytest.raises(ValueError, match="does not fit"):  # the full-weights loader refuses an adapter
        load_weights_into(load_base(tiny_lm_dir), committed)
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):  # and the adapter loader a full model
        load_adapter_into(wrapped(tiny_lm_dir), tiny_lm_dir)
    fresh = wrapped(tiny_lm_dir)
    load_adapter_into(fresh, committed)
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=1e-6, rtol=0)


def test_settings_are_checked_and_a_model_is_wrapped_once(tiny_lm_dir):
    assert LoraSettings(target_modules=["q_proj", "v_proj"]).target_modules == ("q_proj", "v_proj")
    for bad in (dict(r=0), dict(alpha=0), dict(dropout=1.0), dict(target_modules=())):
        with pytest.raises(ValueError):
            LoraSettings(**bad)
    model = wrapped(tiny_lm_dir)
    with pytest.raises(ValueError, match="already a PeftModel"):
        wrap_with_lora(model, LoraSettings())
    with pytest.raises(ValueError):  # a target module the model does not have
        wrap_with_lora(load_base(tiny_lm_dir), LoraSettings(target_modules=("no_such_proj",)))
