"""The trainer's policy at start. Under trainer.parallelism 'fsdp' no rank ever holds the whole model:
the policy is built with its parameters on the meta device (no memory; its buffers real, e.g. the
rotary inv_freq), FSDP2 shards it (parallel.wrap), then each rank gives its shards memory on its
device (to_empty) and reads into them only its rows of the SFT model's safetensors
(gathering.load_weight_rows). At 8B in float32 that is 4 GB per rank at 8 ranks instead of 32 GB on
each. Everywhere else (one process, ddp, LoRA) the policy is loaded whole, as before.

LoRA under fsdp loads whole: PEFT draws each adapter's initial values on the CPU and then moves the
adapter to its base layer's device (peft's _move_adapter_to_device_of_base_layer), which on a meta
base drops them; drawing them again as the one-rank start does would mean replaying PEFT's private
order of initialisation. The base is frozen and sharded right after, so the whole copy is transient."""

from __future__ import annotations

import contextlib
import pathlib
from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

try:  # transformers 5 (the GPU machine's 5.17)
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.57, this project's pin
    from transformers.modeling_utils import no_init_weights

from ..common.config import BelayConfig
from ..common.config_section import resolve_attention
from ..common.models import check_model_dir, load_causal_lm
from . import gathering
from .distributed import Distributed

if TYPE_CHECKING:
    from .trainer import Trainer


def start_policy(config: BelayConfig, device: torch.device, distributed: Distributed | None) -> PreTrainedModel:
    """The policy the Trainer is built on (services/trainer/__main__.py and the tests both call this):
    float32 master weights from trainer.model_dir on `device`; under fsdp at several ranks (not LoRA),
    built empty (parameters on meta), for the Trainer to fill with this rank's rows once sharded."""
    section = config.trainer
    attention = resolve_attention(section.attn_implementation, device)
    if distributed is not None and section.parallelism == "fsdp" and not config.lora.enabled:
        return empty_causal_lm(section.model_dir, device, "trainer.model_dir", attention)
    return load_causal_lm(section.model_dir, device, "trainer.model_dir", attn_implementation=attention)


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside goes to the meta device as it is registered; buffers stay
    where they are made. What accelerate's init_empty_weights() does (include_buffers=False), which
    transformers 4.57 re-exported and 5 no longer has: 5 builds everything on meta, buffers too."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, parameter) -> None:
        register(module, name, parameter)
        if parameter is not None:
            made = module._parameters[name]
            extra = made.__dict__ | {"requires_grad": parameter.requires_grad}
            module._parameters[name] = type(made)(made.to("meta"), **extra)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_causal_lm(model_dir: str, device: torch.device, what: str, attn_implementation: str) -> PreTrainedModel:
    """The model load_causal_lm(model_dir, device, what) gives, float32, with every parameter on the
    meta device and every buffer real on `device`: built as from_pretrained builds before it reads the
    weights (transformers' no_init_weights, and parameters_on_meta),
    so the buffers computed in __init__ (rotary inv_freq) are the ones a whole load keeps."""
    path = check_model_dir(model_dir, what)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with no_init_weights(), parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    for module in model.modules():  # as load_causal_lm's model.to(device) moves them (persistence kept)
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.to(device))
    model.tie_weights()  # from_pretrained ties after reading; under no_init_weights from_config does not
    if (path / "generation_config.json").is_file():  # what a persist writes back, as from_pretrained reads it
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model.eval()


def is_empty(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are on the meta device (built by empty_causal_lm, not yet filled)."""
    return any(local(p).is_meta for p in model.parameters())


def weights_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live, or for an empty model will live: its buffers' device (set by
    empty_causal_lm)."""
    parameter = next(model.parameters())
    if not local(parameter).is_meta:
        return parameter.device
    buffer = next(model.buffers(), None)
    if buffer is None:
        raise ValueError(f"{type(model).__name__} is on the meta device and holds no buffer to say its device by")
    return buffer.device


def fill(trainer: Trainer, model_dir: str | pathlib.Path) -> int:
    """All ranks, once the learner is sharded and before the optimizer is built: memory on
    trainer.device for this rank's shards of the empty policy (to_empty), the real tensors (buffers,
    the critic) kept through it, then this rank's rows of the weights in model_dir read into them.
    Returns the bytes read."""
    learner = trainer.learner
    kept = {name: local(t).detach().clone() for name, t in named_tensors(learner) if not local(t).is_meta}
    learner.to_empty(device=trainer.device)  # FSDP2 re-registers its sharded parameters (same objects)
    with torch.no_grad():
        for name, tensor in named_tensors(learner):
            if name in kept:
                local(tensor).copy_(kept[name])
    check_ties(trainer.model)
    return gathering.load_weight_rows(trainer, model_dir)


def named_tensors(module: torch.nn.Module):
    """(name, tensor) of every parameter and buffer, a shared one once."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor; a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_ties(model: PreTrainedModel) -> None:
    """A tied output head (tie_word_embeddings) must still be the embeddings' very parameter after
    to_empty: load_weight_rows reads it once, as the embeddings."""
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError("the output head came untied from the embeddings while the sharded policy was filled")
