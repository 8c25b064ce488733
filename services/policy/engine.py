"""The policy's model: sampling, behaviour log-probabilities, and hot-swapping weights.

Every use of the weights holds `lock`, so a swap never happens in the middle of a batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import (
    CompileConfig,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..common.checkpoints import checkpoint_problem, load_tensors_into
from ..common.config import GrpcConfig
from ..common.logprob_service import LoadedModel, context_limit
from ..common.lora import adapter_tensors, load_weights_or_adapter
from ..common.models import MIN_TEMPERATURE, below_min_temperature, own_weights, response_logprobs
from ..common.rpc import invalid, too_big
from ..common.token_logprobs import unwrapped
from .kv_cache import SamplingCache, resolve_kv_cache
from .nucleus import WindowedTopP
from .paged_sampling import sample_paged

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 0.9
    max_new_tokens: int = 128
    seed: int | None = None


class Sampled(NamedTuple):
    """What a sampler (sample_padded, sample_paged) hands generate()."""

    new_tokens: list[list[int]]
    logprobs: list[list[float]]
    logprob_seconds: float
    top_p_rows: int = 0
    top_p_sorted_rows: int = 0


@dataclass
class GenerationBatch:
    """Rows in prompt order, samples_per_prompt rows per prompt."""

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]  # behaviour log-probs, teacher-forced on the weights that sampled
    texts: list[str]
    finish_reasons: list[str]  # "eos" or "length"
    version: int
    generate_seconds: float  # sampling
    logprob_seconds: float  # gathering the behaviour log-probs: their forward is the sampling one, but
    # under policy.kv_cache = paged it is a teacher-forced pass of its own
    top_p_rows: int = 0  # rows x steps the top-p window filtered (nucleus.py; 0 without it)
    top_p_sorted_rows: int = 0  # of those, the rows whose nucleus spilled past it: the full sort's

    @property
    def seconds(self) -> float:
        return self.generate_seconds + self.logprob_seconds


Prompt = str | list[dict]  # the user's message, or a chat list [{role, content}, ...] ending with a user turn


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """The user's message (or the whole chat: system prompt and earlier turns kept), templated as a
    conversation awaiting the assistant's answer."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if tokenizer.chat_template:
        # return_dict: a list under transformers 4.57 otherwise, a BatchEncoding under 5
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    if not isinstance(prompt, str):
        raise ValueError("chat messages need a chat template, and this tokenizer has none: use plain prompts")
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def templated_length(tokenizer: PreTrainedTokenizerBase):
    """row -> tokens of its templated prompt (a prompt_data.PromptRow): the data's length filter."""
    return lambda row: len(apply_chat_template(tokenizer, row.chat))


def prompt_chars(prompt: Prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(message["content"]) for message in prompt)


class BehaviourLogprobs(LogitsProcessor):
    """Behaviour log-probabilities log pi(a_t|s_t) at the sampling temperature, read off the very
    forward passes that sampled the tokens: one forward, not a second teacher-forced pass. The
    sampler's own scores are warped by top_p (not pi), so this is the first of generate()'s logits
    processors: each step it gets the raw last-position logits (generate's float32 copy of the
    model's output) and keeps log_softmax(logits / T); the next step's input_ids end with the token
    just sampled, which picks its entry. Memory: one (B, V) row per step, never the whole (B, T, V).
    They equal the teacher-forced log-probs up to float rounding (tests check 1e-5).

    It runs in generate()'s loop, outside the model's forward, so a compiled decode step (the static
    KV cache on CUDA) serves it as an eager one does. A forward hook on the model runs inside the
    compiled call instead: Dynamo compiled it as a frame of its own and recompiled that frame at
    every step (it guards on the length of the list of steps) until its recompile limit (8), then
    ran it eagerly. Being first needs generate()'s own
    processors that come before custom ones (repetition penalty, bad words, min length ...) off: the
    engine's GenerationConfig sets none, and generate() runs without_model_defaults so that a model's
    generation_config.json cannot add one."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # (B, V) log-probs of the step in flight
        self.chosen: list[torch.Tensor] = []  # (B,) per sampled token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids (B, W + t): the prompt and the t tokens sampled so far; scores (B, V): the raw
        logits of step t. Returns the scores untouched."""
        if self.previous is not None:  # input_ids end with the token the previous step sampled
            self.chosen.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> list[list[float]]:
        """Per row, the log-prob of every sampled token (the last one from the last step)."""
        if self.previous is not None and new_tokens.shape[1]:
            self.chosen.append(self.previous.gather(-1, new_tokens[:, -1:].to(self.previous.device)).squeeze(-1))
        if len(self.chosen) != new_tokens.shape[1]:
            raise RuntimeError(f"recorded {len(self.chosen)} steps for {new_tokens.shape[1]} sampled tokens")
        if not self.chosen:
            return [[] for _ in range(new_tokens.shape[0])]
        return torch.stack(self.chosen, dim=1).cpu().tolist()


@contextlib.contextmanager
def without_model_defaults(model: PreTrainedModel):
    """generate() fills every setting its GenerationConfig leaves unset from the model's own
    generation_config.json: a repetition penalty there would warp the logits before BehaviourLogprobs
    reads them. transformers 4.57 can be told not to (use_model_defaults=False); 5.x has no such switch
    and refuses the keyword. So the model's own is set aside for the call, under the engine's lock
    (on the transformers model under a LoRA wrapper: the one generate() reads)."""
    inner = unwrapped(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], str]:
    """Tokens up to and including the first EOS ("eos"), or all of them ("length")."""
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: position + 1], "eos"
    return tokens, "length"


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left, so that every row ends where generation starts.

    -> (input_ids (B, W), attention_mask (B, W)), W the longest row's length.
    """
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.as_tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


class PolicyEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        limits: GrpcConfig,
        version: int = 0,
        max_prompt_tokens: int | None = None,
        kv_cache: str = "auto",
        compile_config: CompileConfig | None = None,
        max_tokens_per_forward: int = 16384,
        top_p_window: int = 1024,
    ):
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_prompt_tokens = max_prompt_tokens  # policy.max_prompt_tokens: what the memory plan counts
        self.sampling_cache = SamplingCache(resolve_kv_cache(kv_cache, model.device), compile_config)
        self.max_tokens_per_forward = max_tokens_per_forward  # the paged sampler's forwards, its log-prob pass
        self.top_p_window = top_p_window  # policy.top_p_window: candidates of the nucleus filter (nucleus.py)
        self.loaded = LoadedModel(model=own_weights(model).eval(), version=version)  # swapped into in place
        self.lock = threading.RLock()
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = tokenizer.pad_token_id
        self.vocab_size = model.get_input_embeddings().num_embeddings

    @property
    def version(self) -> int:
        return self.loaded.version

    def swappable_tensors(self) -> dict[str, torch.Tensor]:
        """What staged tensors are copied into (sharing the model's storage): the adapter's tensors
        for a PeftModel (only they travel under LoRA), else the whole state dict."""
        model = self.loaded.model
        return adapter_tensors(model) if hasattr(model, "peft_config") else model.state_dict()

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    def check_sampling(self, sampling: Sampling, rows: int, prompt_ids: list[list[int]]) -> None:
        if not math.isfinite(sampling.temperature) or sampling.temperature < 0:
            raise invalid(f"temperature must be >= 0 (0 is greedy), got {sampling.temperature}")
        if sampling.temperature > 0 and below_min_temperature(sampling.temperature):
            raise invalid(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {sampling.temperature}")
        if not (0 < sampling.top_p <= 1):
            raise invalid(f"top_p must be in (0, 1], got {sampling.top_p}")
        if sampling.max_new_tokens < 1:
            raise invalid(f"max_new_tokens must be at least 1, got {sampling.max_new_tokens}")
        if rows > self.limits.max_batch_size:
            raise too_big(
                f"{rows} rows (prompts x samples_per_prompt) exceed max_batch_size="
                f"{self.limits.max_batch_size}; split the request"
            )
        limit = context_limit(self.loaded.model, self.limits)
        for index, ids in enumerate(prompt_ids):
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                raise invalid(
                    f"prompt {index} has {len(ids)} tokens, over policy.max_prompt_tokens={self.max_prompt_tokens} "
                    "(the memory plan sizes the KV cache by it): shorten the prompt or raise the limit"
                )
            if len(ids) + sampling.max_new_tokens > limit:
                raise invalid(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens="
                    f"{sampling.max_new_tokens} that passes the limit of {limit} tokens"
                )

    def check_prompts(self, prompts: list[Prompt], samples_per_prompt: int) -> None:
        """The request's size, before any prompt is templated or tokenized."""
        if not prompts:
            raise invalid("empty batch: no prompts")
        if samples_per_prompt < 1:
            raise invalid(f"samples_per_prompt must be at least 1, got {samples_per_prompt}")
        if len(prompts) * samples_per_prompt > self.limits.max_batch_size:
            raise too_big(
                f"{len(prompts) * samples_per_prompt} rows (prompts x samples_per_prompt) exceed "
                f"max_batch_size={self.limits.max_batch_size}; split the request"
            )
        for index, prompt in enumerate(prompts):
            if prompt_chars(prompt) > self.limits.max_text_chars:
                raise too_big(
                    f"prompt {index} has {prompt_chars(prompt)} characters, over "
                    f"max_text_chars={self.limits.max_text_chars}"
                )

    def cache_positions(self, max_new_tokens: int) -> int:
        """Positions a static KV cache holds: the longest prompt Generate accepts
        (policy.max_prompt_tokens, the model's context when unset) plus the response."""
        limit = context_limit(self.loaded.model, self.limits)
        return limit if self.max_prompt_tokens is None else min(limit, self.max_prompt_tokens + max_new_tokens)

    def windowed_top_p(self, sampling: Sampling) -> WindowedTopP | None:
        """The temperature and top-p filter the padded sampler runs in place of transformers' own
        warpers (nucleus.py); None when greedy or with policy.top_p_window 0."""
        if sampling.temperature == 0 or self.top_p_window == 0:
            return None
        return WindowedTopP(sampling.temperature, sampling.top_p, self.top_p_window)

    def generation_config(self, sampling: Sampling, own_warpers: bool = False) -> GenerationConfig:
        """Plain sampling at the temperature and top-p asked for (top-k off), or greedy at temperature 0;
        own_warpers: neither temperature nor top-p, which a WindowedTopP processor applies instead."""
        greedy = sampling.temperature == 0
        static = self.sampling_cache.kind == "static"
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy or own_warpers else sampling.temperature,
            top_p=None if greedy or own_warpers else sampling.top_p,
            top_k=0 if not greedy else None,
            num_beams=1,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            compile_config=self.sampling_cache.compile_config if static else None,
        )

    def generate(self, prompts: list[Prompt], samples_per_prompt: int, sampling: Sampling) -> GenerationBatch:
        """samples_per_prompt responses to each prompt: a user message, or a chat list (Prompt)."""
        self.check_prompts(prompts, samples_per_prompt)
        templated = [apply_chat_template(self.tokenizer, p) for p in prompts]
        self.check_sampling(sampling, len(prompts) * samples_per_prompt, templated)
        index = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
        rows = [templated[i] for i in index]
        start = time.perf_counter()
        with self.lock:
            loaded = self.loaded
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            sample = self.sample_paged if self.sampling_cache.kind == "paged" else self.sample_padded
            sampled = sample(loaded.model, rows, sampling)
        responses, reasons = zip(*(cut_at_eos(row, self.eos_ids) for row in sampled.new_tokens))
        logprobs = [row[: len(tokens)] for row, tokens in zip(sampled.logprobs, responses)]
        total = time.perf_counter() - start
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        return GenerationBatch(
            prompt_index=index,
            prompt_ids=rows,
            response_ids=list(responses),
            logprobs=logprobs,
            texts=texts,
            finish_reasons=list(reasons),
            version=loaded.version,
            generate_seconds=total - sampled.logprob_seconds,
            logprob_seconds=sampled.logprob_seconds,
            top_p_rows=sampled.top_p_rows,
            top_p_sorted_rows=sampled.top_p_sorted_rows,
        )

    def sample_padded(self, model: PreTrainedModel, rows: list[list[int]], sampling: Sampling):
        """`generate()` on the left-padded rows, behaviour log-probs read off its own passes.
        Returns the new tokens per row, their log-probs per row, the seconds spent gathering those, and
        the top-p window's rows (Sampled)."""
        device = next(model.parameters()).device
        input_ids, attention_mask = left_padded(rows, self.pad_id)  # (B, W) each
        width = input_ids.shape[1]
        recorder = BehaviourLogprobs(sampling.temperature or 1.0)
        warpers = self.windowed_top_p(sampling)  # after the recorder, which reads the raw logits
        cache = self.sampling_cache.generate_kwargs(model, len(rows), self.cache_positions(sampling.max_new_tokens))
        with torch.no_grad(), without_model_defaults(model):
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=self.generation_config(sampling, own_warpers=warpers is not None),
                logits_processor=LogitsProcessorList([recorder] + ([warpers] if warpers else [])),
                **cache,
            )
        start = time.perf_counter()
        logprobs = recorder.finish(output[:, width:])  # (B, new tokens)
        seconds = time.perf_counter() - start
        counts = (warpers.rows, warpers.fallback_rows) if warpers else (0, 0)
        return Sampled(output[:, width:].tolist(), logprobs, seconds, *counts)

    def sample_paged(self, model: PreTrainedModel, rows: list[list[int]], sampling: Sampling):
        """Continuous batching (paged_sampling.py), then the behaviour log-probs of each response up
        to its EOS from a teacher-forced pass on the same weights. Returns as sample_padded."""
        config = self.generation_config(sampling)
        with without_model_defaults(model):
            new_tokens = sample_paged(model, rows, config, self.max_tokens_per_forward, sampling.seed)
        start = time.perf_counter()
        responses = [cut_at_eos(tokens, self.eos_ids)[0] for tokens in new_tokens]
        logprobs = response_logprobs(
            model, rows, responses, self.pad_id, sampling.temperature or 1.0, self.max_tokens_per_forward
        )
        return Sampled(new_tokens, [row.tolist() for row in logprobs], time.perf_counter() - start)

    def swap_to(self, version: int, source) -> float:
        """Load a version's weights in place, between batches. Returns seconds taken.

        `source` is a committed version directory (a published or persisted one) or tensors a
        receiving transport staged in memory (name -> tensor; adapter tensors under LoRA). Every
        key and shape is checked before anything is copied, so bad weights raise and leave the
        old ones serving.
        """
        start = time.perf_counter()
        with self.lock:
            if version <= self.loaded.version:
                return 0.0
            model = self.loaded.model
            if isinstance(source, Mapping):
                load_tensors_into(self.swappable_tensors(), source, f"version {version}")
                shown = "staged tensors"
            else:
                problem = checkpoint_problem(source, full=False)  # sizes: cheap, catches half-written files
                if problem is not None:
                    raise ValueError(f"checkpoint {source} refused: {problem}")
                load_weights_or_adapter(model, source)  # LoRA: only the adapter tensors travel
                shown = str(source)
            self.loaded = LoadedModel(model=model, version=version)
        seconds = time.perf_counter() - start
        log.info("hot-swapped to version %d from %s in %.3f s", version, shown, seconds)
        return seconds
