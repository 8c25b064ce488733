"""Wrapping the learner (the policy and its critic) for the configured data parallelism under torchrun:
PyTorch's DistributedDataParallel ('ddp', a whole copy per rank) or FSDP2 ('fsdp', fully_shard on
each transformer block and then on the root). Either reduces the gradients in backward as the mean
over ranks, so no gradient all-reduce is written by hand. The optimizer is built after wrapping:
under FSDP2 the parameters become DTensors, each rank holding its shard."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..common.token_logprobs import model_response_stats, unwrapped


class Learner(torch.nn.Module):
    """The policy and the critic (or None) as one module, so that one wrapper covers both and every
    forward pass goes through the wrapper's hooks (DDP prepares its reduction there, FSDP2 gathers
    the root's parameters). forward -> (logprobs (B, T-1), entropy (B, T-1), log-probs at top_ids
    (B, T-1, K) or None, values (B, T-1) or None)."""

    def __init__(self, model: torch.nn.Module, value_head: torch.nn.Module | None):
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(self, input_ids, attention_mask, response_mask, temperature, chunk_positions, top_ids=None):
        stats, hidden = model_response_stats(
            self.model, input_ids, attention_mask, response_mask, temperature, chunk_positions, top_ids
        )
        values = None
        if self.value_head is not None:  # float32 whatever the autocast around the policy
            with torch.autocast(hidden.device.type, enabled=False):
                values = self.value_head(hidden[:, :-1].float())
        outputs = stats.logprobs, stats.entropy, stats.top_logprobs, values
        # Views copied out: FSDP2's pre-backward hook on a view is lost to an in-place op on it (it warns).
        return tuple(t if t is None or t._base is None else t.clone() for t in outputs)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks, found by the class names Hugging Face lists in
    _no_split_modules (e.g. LlamaDecoderLayer), under a PEFT wrapper too."""
    names = set(getattr(unwrapped(model), "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(
            f"trainer.parallelism 'fsdp' shards per transformer block, but {type(unwrapped(model)).__name__} names "
            f"none in _no_split_modules ({sorted(names)}); use trainer.parallelism: ddp"
        )
    return blocks


def mixed_precision(compute_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """FSDP2's policy for trainer.dtype, on any device (CUDA with NCCL, the CPU with gloo): with a 16-bit
    dtype each FSDP group's parameters are gathered in it for the forward and backward, and the gradients
    reduce-scattered in float32 into the float32 shards AdamW steps; with float32, FSDP2's default
    (everything in float32). update.forward's autocast still wraps the forward and composes with it: the
    matmuls run in the 16-bit dtype either way, and the ops autocast keeps in float32 upcast their
    inputs. One process and ddp have no such policy: their weights stay float32 and that autocast alone
    computes in the 16-bit dtype, so norms, embeddings and the residual stream stay float32 there.
    Master weights and AdamW are float32 in every case."""
    if compute_dtype in (torch.bfloat16, torch.float16):
        return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def wrap(
    learner: Learner, parallelism: str | None, device: torch.device, compute_dtype: torch.dtype
) -> torch.nn.Module:
    """The learner as the update calls it: itself for one process (parallelism None), DDP-wrapped
    for 'ddp', sharded in place for 'fsdp' (the same object, its parameters now DTensors)."""
    if parallelism is None:
        return learner
    if parallelism == "ddp":
        # No buffer broadcast before each forward: a causal LM's buffers (rotary frequencies) are the
        # same on every rank, and a forward free of collectives lets one rank's out-of-memory there be
        # told to the others before the backward (update.minibatch_step) instead of hanging them.
        return DistributedDataParallel(
            learner, device_ids=[device.index or 0] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if parallelism != "fsdp":
        raise ValueError(f"trainer.parallelism must be 'ddp' or 'fsdp', got {parallelism!r}")
    policy = mixed_precision(compute_dtype)
    for block in transformer_blocks(learner.model):
        fully_shard(block, mp_policy=policy)
    if learner.value_head is not None:  # the critic computes in float32 (ValueHead): gathered in float32,
        # in a group of its own, rather than rounded to the 16-bit dtype with the root.
        fully_shard(learner.value_head, mp_policy=MixedPrecisionPolicy())
    fully_shard(learner, mp_policy=policy)  # the root: embeddings, final norm, output head
    return learner


def is_sharded(learner: torch.nn.Module) -> bool:
    """Whether the learner's parameters are FSDP2 shards (DTensors)."""
    return any(isinstance(p, torch.distributed.tensor.DTensor) for p in learner.parameters())
