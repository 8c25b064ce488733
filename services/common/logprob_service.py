"""The LogProbs RPC that policy and reference both serve: validation, then the shared computation."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from belay.v1 import belay_pb2

from .config import GrpcConfig
from .models import (
    MIN_TEMPERATURE,
    below_min_temperature,
    response_logprobs,
    response_logprobs_with_top_k,
    weights_fingerprint,
)
from .packing import PackingError, pack_float32, pack_int32, unpack_int32
from .rpc import invalid, too_big

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """Weights that serve requests, with the version they are. A swap makes a new LoadedModel."""

    model: PreTrainedModel
    version: int

    @functools.cached_property
    def revision(self) -> str:
        """Content fingerprint of the weights, computed on first use (hashing every weight is
        slower than an adapter swap, so it stays off the hot-swap path)."""
        return weights_fingerprint(self.model)


def context_limit(model: PreTrainedModel, limits: GrpcConfig) -> int:
    positions = getattr(model.config, "max_position_embeddings", None) or limits.max_sequence_length
    return min(limits.max_sequence_length, positions)


def check_token_rows(rows: list[np.ndarray], name: str, vocab_size: int, allow_empty: bool = False) -> None:
    for index, row in enumerate(rows):
        if len(row) == 0 and not allow_empty:
            raise invalid(f"{name} row {index} is empty; every row needs at least one token")
        if len(row) and (row.min() < 0 or row.max() >= vocab_size):
            bad = int(row[(row < 0) | (row >= vocab_size)][0])
            raise invalid(f"{name} row {index} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def parse_logprobs_request(
    request: belay_pb2.LogProbsRequest, vocab_size: int, max_length: int, limits: GrpcConfig
) -> tuple[list[list[int]], list[list[int]], float]:
    """Checks a LogProbs request; returns (prompts, responses, temperature) or raises RequestError."""
    try:
        prompts = unpack_int32(request.prompt_ids, "prompt_ids")
        responses = unpack_int32(request.response_ids, "response_ids")
    except PackingError as error:
        raise invalid(str(error)) from None
    if not prompts:
        raise invalid("empty batch: prompt_ids has no rows")
    if len(prompts) != len(responses):
        raise invalid(f"prompt_ids has {len(prompts)} rows but response_ids has {len(responses)}")
    if len(prompts) > limits.max_batch_size:
        raise too_big(f"batch of {len(prompts)} rows exceeds max_batch_size={limits.max_batch_size}; split it")
    check_token_rows(prompts, "prompt_ids", vocab_size)
    check_token_rows(responses, "response_ids", vocab_size)
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(prompt) + len(response) > max_length:
            raise invalid(
                f"row {index} has {len(prompt) + len(response)} tokens, over the limit of {max_length} "
                "(the model's context or grpc.max_sequence_length)"
            )
    temperature = request.temperature or 1.0
    if not math.isfinite(temperature) or temperature <= 0:
        raise invalid(f"temperature must be a positive number, got {request.temperature}")
    if below_min_temperature(temperature):
        raise invalid(f"temperature must be at least {MIN_TEMPERATURE:g} (0 means 1.0), got {request.temperature}")
    if request.top_k > vocab_size:
        raise invalid(f"top_k={request.top_k} exceeds the vocabulary size {vocab_size}")
    reply_bytes = 8 * request.top_k * sum(len(r) for r in responses)
    if reply_bytes > limits.max_message_bytes:
        raise too_big(
            f"top_k={request.top_k} rows for {sum(len(r) for r in responses)} tokens need about "
            f"{reply_bytes} bytes, over max_message_bytes={limits.max_message_bytes}; lower top_k or split"
        )
    return [p.tolist() for p in prompts], [r.tolist() for r in responses], temperature


@contextlib.contextmanager
def out_of_memory_refused(max_tokens_per_forward: int):
    """A CUDA out-of-memory in a forward becomes RESOURCE_EXHAUSTED naming the setting that shrinks
    the forward, logged, with the allocator's cache freed so the next (smaller) request can run;
    left alone it was an INTERNAL error with a traceback, which callers retried without a word why."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = (
            f"out of memory in a forward of up to {max_tokens_per_forward} tokens "
            f"({str(error).splitlines()[0] if str(error) else 'OutOfMemoryError'}); lower this service's "
            "max_tokens_per_forward, or give it more of the device (the memory plan at its start says how much)"
        )
        log.error("%s", message)
        raise too_big(message) from error


class LogProbsHandler:
    """Serves LogProbs from whatever LoadedModel `current()` returns at the time of the call."""

    def __init__(self, current, tokenizer: PreTrainedTokenizerBase, limits: GrpcConfig, max_tokens_per_forward: int):
        self.current = current
        self.pad_id = tokenizer.pad_token_id
        self.limits = limits
        self.max_tokens_per_forward = max_tokens_per_forward
        self.lock = threading.Lock()  # one forward at a time: CPU threads are already all in use

    def __call__(self, request: belay_pb2.LogProbsRequest) -> belay_pb2.LogProbsResponse:
        loaded: LoadedModel = self.current()
        vocab_size = loaded.model.get_input_embeddings().num_embeddings
        prompts, responses, temperature = parse_logprobs_request(
            request, vocab_size, context_limit(loaded.model, self.limits), self.limits
        )
        reply = belay_pb2.LogProbsResponse(policy_version=loaded.version)
        with self.lock, out_of_memory_refused(self.max_tokens_per_forward):
            if request.top_k:
                rows, top_rows = response_logprobs_with_top_k(
                    loaded.model,
                    prompts,
                    responses,
                    self.pad_id,
                    request.top_k,
                    temperature,
                    self.max_tokens_per_forward,
                )
            else:
                rows = response_logprobs(
                    loaded.model, prompts, responses, self.pad_id, temperature, self.max_tokens_per_forward
                )
        if request.top_k:
            reply.top_ids.CopyFrom(pack_int32([ids.numpy().reshape(-1) for ids, _ in top_rows]))
            reply.top_logprobs.CopyFrom(pack_float32([values.numpy().reshape(-1) for _, values in top_rows]))
        reply.logprobs.CopyFrom(pack_float32([r.numpy() for r in rows]))
        return reply
