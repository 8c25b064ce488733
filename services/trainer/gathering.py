"""Whole weights out of an FSDP2-sharded learner, and back in: every rank takes part in each gather
(collectives), rank 0 alone keeps the result. The weights are gathered after every update, for
publishing and for the persisted Hugging Face directory. The AdamW state and the critic are never
gathered: a persist writes them as per-rank shards (sharded_persist.py). load_whole reads a checkpoint
persisted by one rank or under ddp (whole AdamW state, in the one-rank format) into this rank's shards."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..common.checkpoints import weight_files

if TYPE_CHECKING:
    from .trainer import Trainer

TO_RANK_0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only


class GatheredModel:
    """A model as serving_tensors, adapter_tensors and weights_fingerprint read it, with state_dict()
    the gathered whole tensors (tied names share one tensor, which serving_tensors writes once);
    everything else (config, peft_config) read from the live model."""

    def __init__(self, model: torch.nn.Module, state: dict[str, torch.Tensor]):
        self._model, self._state = model, state

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self._state

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def split(trainer: Trainer, learner_state: dict[str, torch.Tensor]):
    """The learner's state -> (the policy's, a tied name holding the very tensor of the name it is tied
    to, as in a live state_dict; the critic's)."""
    model = {k[len("model.") :]: v for k, v in learner_state.items() if k.startswith("model.")}
    first: dict[int, str] = {}
    for name, parameter in trainer.model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(parameter), name)
        if canonical != name and canonical in model:
            model[name] = model[canonical]
    critic = {k[len("value_head.") :]: v for k, v in learner_state.items() if k.startswith("value_head.")}
    return model, critic


def gather_weights(trainer: Trainer, everywhere: bool = False) -> GatheredModel | None:
    """All ranks: the whole policy, on rank 0 (on every rank with `everywhere`, for checking that
    replicas agree). Rank 0 keeps it as trainer.full_model (what publishing and persisting read)."""
    options = StateDictOptions(full_state_dict=True) if everywhere else TO_RANK_0
    model, _ = split(trainer, get_model_state_dict(trainer.learner, options=options))
    gathered = GatheredModel(trainer.model, model)
    if trainer.main_rank:
        trainer.full_model = gathered
    return gathered if (everywhere or trainer.main_rank) else None


def parameter_indices(trainer: Trainer) -> dict[str, int]:
    """The learner's parameter names -> their place in Trainer.parameters (the optimizer's order)."""
    names = {id(p): n for n, p in trainer.learner.named_parameters()}
    return {names[id(p)]: i for i, p in enumerate(trainer.parameters)}


def load_whole(trainer: Trainer, weights: dict[str, torch.Tensor], critic: dict, optimizer_state: dict) -> None:
    """All ranks: a checkpoint's whole weights (the policy's, as persisted; under LoRA the adapter's,
    keyed as PEFT saves them), critic and one-rank optimizer state, into this rank's shards."""
    load_weights(trainer, weights, critic)
    names = {i: n for n, i in parameter_indices(trainer).items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optimizer_state["param_groups"]]
    whole = {"state": {names[int(i)]: values for i, values in optimizer_state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(trainer.learner, trainer.optimizer, whole, options=StateDictOptions(full_state_dict=True))


def load_weights(trainer: Trainer, weights: dict[str, torch.Tensor], critic: dict | None = None) -> None:
    """All ranks: whole weights as persisted (and the critic's, when given) into this rank's shards."""
    state = {}
    for key in get_model_state_dict(trainer.learner):
        saved = persisted_name(trainer, key)
        if saved in weights:
            state[key] = weights[saved]
        elif key.startswith("value_head.") and critic:
            state[key] = critic[key[len("value_head.") :]]
    set_model_state_dict(trainer.learner, state, options=StateDictOptions(full_state_dict=True, strict=False))


def persisted_name(trainer: Trainer, learner_key: str) -> str:
    """A learner state key -> its name in the persisted weights: 'model.' off; under LoRA the adapter
    name off too ('...lora_A.default.weight' -> '...lora_A.weight'), as PEFT saves adapters."""
    key = learner_key[len("model.") :] if learner_key.startswith("model.") else learner_key
    if trainer.config.lora.enabled:
        adapter = getattr(trainer.model, "active_adapter", "default")
        key = key.replace(f".{adapter}.", ".")
    return key


def persisted_weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights (or adapter) files, whole, as plain safetensors reads them."""
    weights = {}
    for file in weight_files(path):
        weights.update(load_file(str(file)))
    return weights
