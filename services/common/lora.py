"""LoRA adapters for the policy: wrap, save, recognise and hot-swap, adapter weights only.

The trainer trains LoRA adapters on a frozen base model, so a checkpoint needs only the adapter
weights: adapter_model.safetensors + adapter_config.json, the standard PEFT layout (keys as
peft.get_peft_model_state_dict names them, e.g. `base_model.model.model.layers.0.self_attn.q_proj
.lora_A.weight`, without the adapter name). The policy holds its own LoRA-wrapped copy of the same
base model and hot-swaps by copying just those tensors into its adapter in place; the reference
stays the untouched base model (a separately loaded copy: get_peft_model edits the model it wraps).

Nothing here unpickles: adapter tensors come from safetensors only; a .bin is never read.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .checkpoints import load_weights_into

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Config fields that change what the adapter tensors mean; a checkpoint must agree on all of them.
# r and target_modules decide the tensors' shapes and keys, lora_alpha (with use_rslora) the scale
# the update is multiplied by, use_dora whether extra magnitude vectors exist.
CHECKED_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora")
_FIELD_DEFAULTS = {"peft_type": "LORA", "use_rslora": False, "use_dora": False}


@dataclass
class LoraSettings:
    """What the trainer and the policy must agree on to share adapters (the same values on both)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        # Settings often come from YAML/JSON, where a tuple arrives as a list.
        self.target_modules = tuple(self.target_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"lora target_modules must be non-empty module names, got {self.target_modules!r}")


def lora_config(settings: LoraSettings) -> LoraConfig:
    """The one place settings become a peft LoraConfig, so trainer and policy build identical adapters."""
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )


def wrap_with_lora(model: torch.nn.Module, settings: LoraSettings) -> PeftModel:
    """Put LoRA adapters on settings.target_modules; only the adapters take gradients.

    peft edits `model` in place (its target Linears become lora.Linear wrappers around the
    original weights), so never pass the reference model: load a separate copy for it.
    LoRA B starts at zero, so at initialisation the wrapped forward equals the base forward.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; wrap the plain base model once")
    peft_model = get_peft_model(model, lora_config(settings))
    # peft already freezes the base; enforce it explicitly, since a trainable base weight would
    # silently make adapter-only checkpoints incomplete.
    for name, parameter in peft_model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"no LoRA parameters were created for target modules {settings.target_modules}")
    return peft_model


def _adapter_name(peft_model: PeftModel) -> str:
    return peft_model.active_adapter


def adapter_tensors(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The active adapter's weights only, keyed as PEFT saves them (no adapter name in the keys).

    The tensors share storage with the live parameters (they come from state_dict()), which is
    what lets load_adapter_into copy into them in place.
    """
    return get_peft_model_state_dict(peft_model, adapter_name=_adapter_name(peft_model))


def adapter_config(peft_model: PeftModel) -> dict:
    """The active adapter's config as adapter_config.json holds it."""
    config = peft_model.peft_config[_adapter_name(peft_model)].to_dict()
    for key, value in config.items():
        if isinstance(value, set):  # target_modules is a set; sorted for a deterministic file
            config[key] = sorted(value)
    config["inference_mode"] = True  # as PeftModel.save_pretrained writes it
    return config


def save_adapter(peft_model: PeftModel, directory: str | os.PathLike) -> None:
    """Write adapter_model.safetensors and adapter_config.json into `directory` (nothing else)."""
    write_adapter_files(directory, adapter_tensors(peft_model), adapter_config(peft_model))


def write_adapter_files(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> int:
    """adapter_model.safetensors and adapter_config.json from tensors (live or a snapshot's copies).

    Written by hand rather than with PeftModel.save_pretrained so that no README or .bin ever
    appears and the files are exactly these two; the layout still loads with PeftModel.from_pretrained.
    Meant to be called inside checkpoints.write_checkpoint, which commits atomically. Returns bytes.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return (directory / ADAPTER_WEIGHTS).stat().st_size


def is_adapter_checkpoint(directory: str | os.PathLike) -> bool:
    """True for an adapter-only checkpoint (adapter_config.json present), as opposed to full weights."""
    return (pathlib.Path(directory) / ADAPTER_CONFIG).is_file()


def _normalised(field: str, value):
    if field == "target_modules":
        return sorted(value) if isinstance(value, (list, tuple, set)) else value
    if field == "peft_type":
        return getattr(value, "value", value)
    return value


def load_adapter_into(peft_model: PeftModel, directory: str | os.PathLike) -> None:
    """Copy an adapter checkpoint's tensors into `peft_model`'s active adapter, in place.

    Everything is checked before anything is copied: the config fields that give the tensors
    their meaning (r, lora_alpha, target_modules, ...), then every key and shape. Any misfit
    raises ValueError naming the field or the keys/shapes, and the model is left unchanged, so
    a policy keeps serving its current weights when handed a bad checkpoint. Copying in place
    keeps parameter identities, so nothing else (optimizer, compiled graphs) needs rebuilding.
    """
    directory = pathlib.Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} holds no {ADAPTER_CONFIG}: not an adapter checkpoint")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory} holds no {ADAPTER_WEIGHTS} (pickled adapters are never loaded)")

    saved_config = json.loads(config_path.read_text())
    own_config = adapter_config(peft_model)
    for field in CHECKED_FIELDS:
        default = _FIELD_DEFAULTS.get(field)
        saved = _normalised(field, saved_config.get(field, default))
        own = _normalised(field, own_config.get(field, default))
        if saved != own:
            raise ValueError(f"{directory}: adapter {field} is {saved!r}, the model's adapter has {own!r}")

    state = load_file(str(weights_path))
    own_tensors = adapter_tensors(peft_model)
    unexpected = sorted(set(state) - set(own_tensors))
    missing = sorted(set(own_tensors) - set(state))
    if unexpected or missing:
        raise ValueError(
            f"{directory} does not fit the model's adapter: {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}, {len(missing)} missing keys {missing[:5]}"
        )
    bad_shapes = [
        f"{name}: checkpoint {tuple(state[name].shape)}, model {tuple(own_tensors[name].shape)}"
        for name in sorted(state)
        if state[name].shape != own_tensors[name].shape
    ]
    if bad_shapes:
        raise ValueError(f"{directory}: {len(bad_shapes)} adapter tensors have the wrong shape: {bad_shapes[:5]}")
    not_floating = sorted(name for name, tensor in state.items() if not tensor.is_floating_point())
    if not_floating:
        raise ValueError(f"{directory}: adapter tensors are not floating point: {not_floating[:5]}")
    live = {parameter.data_ptr() for parameter in peft_model.parameters()}
    detached = sorted(name for name, tensor in own_tensors.items() if tensor.data_ptr() not in live)
    if detached:  # a copy into these would change nothing; never report success for that
        raise RuntimeError(f"adapter tensors do not share storage with the model's parameters: {detached[:5]}")

    with torch.no_grad():
        for name, tensor in state.items():
            own_tensors[name].copy_(tensor)


def lora_settings(section) -> LoraSettings:
    """LoraSettings from the config's `lora:` section (services.common.config.LoraConfig)."""
    return LoraSettings(
        r=section.r, alpha=section.alpha, dropout=section.dropout, target_modules=tuple(section.target_modules)
    )


def load_weights_or_adapter(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """A checkpoint's weights into `model` in place: its adapters into a LoRA model when it is an
    adapter checkpoint (adapter_config.json), else its full weights. Both check everything first and
    leave the model unchanged on a misfit."""
    if is_adapter_checkpoint(directory):
        load_adapter_into(model, directory)
    else:
        load_weights_into(model, directory)
