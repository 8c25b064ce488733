"""Whole weights out of an FSDP2-sharded learner, and back in: every rank takes part in each gather
(collectives), rank 0 alone keeps the result. The weights are gathered after every update, for
publishing and for the persisted Hugging Face directory. The AdamW state and the critic are never
gathered: a persist writes them as per-rank shards (sharded_persist.py). Back in, no rank reads the whole
weights: load_weight_rows reads from the memory-mapped Hugging Face files only the rows of this rank's
shards (on resume and on a rollback); load_whole adds the critic and the AdamW state of a checkpoint
persisted by one rank or under ddp (in the one-rank format, whole in trainer_state.safetensors)."""

from __future__ import annotations

import logging
import os
import pathlib
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from ..common.checkpoints import weight_files
from . import shards

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)
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


def load_whole(trainer: Trainer, directory: pathlib.Path, critic: dict, optimizer_state: dict) -> None:
    """All ranks: a checkpoint persisted whole (one process, ddp) into this rank's shards: the policy's
    weights read row by row from its files (load_weight_rows), the critic's and the one-rank optimizer
    state's rows taken from the whole tensors trainer_state.safetensors held."""
    own = get_model_state_dict(trainer.learner)
    heads = {key: key[len("value_head.") :] for key in own if key.startswith("value_head.")}
    absent = sorted(name for name in heads.values() if name not in critic)
    if absent:
        raise ValueError(f"{directory} holds no value_head/{absent[0]}: it was persisted without this critic")
    load_weight_rows(trainer, directory)
    for key, name in heads.items():
        copy_rows(own[key], critic[name])
    names = {i: n for n, i in parameter_indices(trainer).items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optimizer_state["param_groups"]]
    whole = {"state": {names[int(i)]: values for i, values in optimizer_state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(trainer.learner, trainer.optimizer, whole, options=StateDictOptions(full_state_dict=True))


def copy_rows(target: torch.Tensor, source) -> int:
    """Copy into this rank's piece of `target` (a DTensor: its local shard, FSDP2's Shard(0) rows as
    torch.chunk cuts them; a plain tensor: all of it) those rows of `source`, the whole tensor: a
    torch.Tensor, or a safetensors slice, of which only the rows asked for are read from the
    memory-mapped file. Cast to target's dtype on the copy. Returns the bytes taken from `source`."""
    shape, offset, _ = shards.piece_box(target, 0)
    own = target.to_local() if isinstance(target, DTensor) else target
    rows = source[tuple(slice(start, start + size) for start, size in zip(offset, shape))]
    with torch.no_grad():
        own.copy_(rows)
    return rows.numel() * rows.element_size()


def load_weight_rows(trainer: Trainer, directory: str | os.PathLike) -> int:
    """All ranks under fsdp: the weights a directory holds as persisted (a checkpoint's; under LoRA its
    adapter; the SFT model's) into this rank's shards. Each rank reads from the memory-mapped files
    (safe_open, get_slice) only the rows its shard holds, about 1/N of the file: no rank ever holds the
    whole weights. Names and shapes are checked from the headers first (a misfit raises and changes
    nothing). Returns the bytes this rank read."""
    directory = pathlib.Path(directory)
    own = get_model_state_dict(trainer.learner)  # this rank's shards, sharing the parameters' storage
    keys = {persisted_name(trainer, key): key for key in own if key.startswith("model.")}
    files = checked_weight_files(trainer, directory, {name: tuple(own[key].shape) for name, key in keys.items()})
    read = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                read += copy_rows(own[keys[name]], handle.get_slice(name))
    whole = sum(file.stat().st_size for file in files)
    rank = trainer.distributed.rank if trainer.distributed else 0
    log.info("rank %d read %d of the %d bytes of weights in %s", rank, read, whole, directory)
    return read


def checked_weight_files(trainer: Trainer, directory: pathlib.Path, shapes: dict[str, tuple[int, ...]]) -> list:
    """The directory's weight files, after checking from their headers that every tensor in them is one
    of `shapes` (persisted name -> the learner's global shape), of that shape, and that every weight the
    model needs is there (under LoRA: the adapter's; a tied name once). Else ValueError naming it."""
    files = weight_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory} holds no model *.safetensors")
    found = set()
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if name not in shapes:
                    raise ValueError(f"{file} holds {name}, which the trainer's model has no parameter for")
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != shapes[name]:
                    raise ValueError(f"{file}: {name} has shape {shape}, the trainer's model expects {shapes[name]}")
                found.add(name)
    lora = trainer.config.lora.enabled
    missing = sorted(
        persisted_name(trainer, key)
        for key, _ in trainer.learner.named_parameters()  # a tied parameter under its first name only
        if key.startswith("model.") and (not lora or "lora_" in key) and persisted_name(trainer, key) not in found
    )
    if missing:
        raise ValueError(f"{directory} lacks {len(missing)} of the model's weights: {missing[:5]}")
    return files


def persisted_name(trainer: Trainer, learner_key: str) -> str:
    """A learner state key -> its name in the persisted weights: 'model.' off; under LoRA the adapter
    name off too ('...lora_A.default.weight' -> '...lora_A.weight'), as PEFT saves adapters."""
    key = learner_key[len("model.") :] if learner_key.startswith("model.") else learner_key
    if trainer.config.lora.enabled:
        adapter = getattr(trainer.model, "active_adapter", "default")
        key = key.replace(f".{adapter}.", ".")
    return key
