"""The memory of policy.kv_cache = paged (transformers 5's continuous batching, issue #14): how its
cache and its forwards are sized, and the policy's memory plan under it. Pure arithmetic, as
memory_plan.py; services/policy/paged_sampling.py sizes each batch with the same functions, so what
the plan counts is what the policy allocates.

- The cache: every row of a batch is in flight at once, each in whole blocks of BLOCK_POSITIONS,
  N = rows x ceil(width / 64) x 64 positions (width = prompt + new tokens).
- A forward holds at most M tokens (continuous batching's max_batch_tokens): M <= the policy's
  max_tokens_per_forward and <= rows x width. With any attention but flash_attention_2, continuous
  batching also allocates an attention mask of M x (N + M) elements in the model's dtype, once per
  batch (transformers 5.17, generation/continuous_batching/input_outputs.py): at M = 16,384 and the
  default 1,024-token prompt limit, 512 rows would make it 19.9 GB. So M is also bounded to keep the
  mask no bigger than the cache: M x (N + M) <= c x N, c = 2 L g d (the cache's elements a position),
  M = floor((sqrt(N^2 + 4 c N) - N) / 2). Never below the rows (a decode step then holds every row)
  nor below one block. Where the cache itself is large the bound saves little (16.9 GB there): the
  plan counting the mask is what keeps such a batch off a card that cannot hold it.
- The plan: the cache above; the mask; the prefill, one layer's activations over min(M, rows x
  prompt) tokens a forward; and the teacher-forced pass that reads the behaviour log-probs after
  sampling: one layer's activations over min(max_tokens_per_forward, rows x width) tokens and the
  log-prob chunk, as the reference's (they are not alive together with the prefill's: counted
  apart, an upper bound).
"""

from __future__ import annotations

import math

from .memory_plan import (
    MemoryItem,
    ModelShape,
    ServicePlan,
    activation_bytes_per_layer,
    kv_cache_bytes,
    logprob_chunk_bytes,
    policy_plan,
)

BLOCK_POSITIONS = 64  # positions per cache block


def paged_positions(rows: int, width: int) -> int:
    """N: the cache's positions for `rows` rows of at most `width` positions, whole blocks a row."""
    return rows * math.ceil(width / BLOCK_POSITIONS) * BLOCK_POSITIONS


def paged_batch_tokens(shape: ModelShape, rows: int, width: int, tokens_limit: int, masked: bool) -> int:
    """M: the most tokens one forward holds (see the module's docstring); masked: the attention is not
    flash_attention_2, so continuous batching builds an attention mask."""
    tokens = min(tokens_limit, rows * width)
    if masked:
        positions = paged_positions(rows, width)
        per_position = 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim
        bound = math.isqrt(positions * positions + 4 * per_position * positions) - positions
        tokens = min(tokens, max(rows, bound // 2))
    return max(BLOCK_POSITIONS, tokens)


def paged_mask_bytes(shape: ModelShape, rows: int, width: int, tokens_limit: int, dtype_bytes: int) -> int:
    """M x (N + M) x e: the attention mask continuous batching allocates when the attention is not flash."""
    tokens = paged_batch_tokens(shape, rows, width, tokens_limit, masked=True)
    return tokens * (paged_positions(rows, width) + tokens) * dtype_bytes


def paged_policy_plan(
    shape: ModelShape,
    dtype_bytes: int,
    rows: int,
    prompt_tokens: int,
    new_tokens: int,
    device: str,
    tokens_limit: int,
    masked: bool,
    logprob_positions: int,
) -> ServicePlan:
    """The policy's plan under policy.kv_cache = paged (the module's docstring); tokens_limit is
    policy.max_tokens_per_forward, logprob_positions the log-prob chunk's positions."""
    width = prompt_tokens + new_tokens
    batch_tokens = paged_batch_tokens(shape, rows, width, tokens_limit, masked)
    teacher_forced = min(tokens_limit, rows * width)
    hint = "lower policy.max_tokens_per_forward"
    extra = [
        MemoryItem(
            "policy paged attention mask",
            paged_mask_bytes(shape, rows, width, tokens_limit, dtype_bytes) if masked else 0,
            f"{hint}, or attn_implementation: flash_attention_2 (no mask)",
        ),
        MemoryItem(
            "policy log-prob pass activations", activation_bytes_per_layer(shape, teacher_forced, dtype_bytes), hint
        ),
        MemoryItem("policy log-prob chunk", logprob_chunk_bytes(shape, min(logprob_positions, teacher_forced)), hint),
    ]
    return policy_plan(
        shape,
        dtype_bytes,
        rows,
        prompt_tokens,
        new_tokens,
        device,
        kv_cache=kv_cache_bytes(shape, 1, paged_positions(rows, width), dtype_bytes),
        prefill_tokens=min(batch_tokens, rows * prompt_tokens),
        extra=extra,
    )
