"""policy.kv_cache = paged: sampling by transformers' continuous batching (`generate_batch`, paged
attention), issue #14.

Continuous batching packs the tokens of many sequences into each forward and gives a finished row's
cache blocks to the next one, so no step computes on padding. That packing is why the engine's
behaviour log-probs cannot be read off the sampling passes here, as BehaviourLogprobs reads them
from `generate()`'s: continuous batching hands its logits processors one packed row per sequence
in flight, and its own `return_logprobs` gives log-probs of the distribution after top-p (not pi).
So the engine reads them with a teacher-forced pass on the same weights, under the same lock
(`models.response_logprobs`, chunked like the reference's): exact by construction, at the price of
one forward over the batch's prompt + response tokens (a prefill of the whole batch; the sampling
costs max_new_tokens such forwards, one token a row each). That is what OpenRLHF and veRL do after
vLLM samples.

Needs transformers 5's API (`ContinuousBatchingConfig`, the `paged|` attention it switches the
model to during the call and back after); transformers 4.57, this project's CPU pin, lacks it and
is refused at start. The tests run under 5.17, the GPU machine's version (`make test`'s
`test-transformers5`).

The paged cache is sized here, not by transformers' default (which takes 90 % of the device's free
memory, and four services may share it): rows x (widest prompt + max_new_tokens) positions,
rounded up to whole blocks per row, at most what the memory plan counts for the policy's KV cache
(rows x (max_prompt_tokens + max_new_tokens)) plus BLOCK_SIZE - 1 positions a row.
"""

from __future__ import annotations

import logging
import math

import transformers
from transformers import GenerationConfig, PreTrainedModel

BLOCK_SIZE = 64  # positions per cache block

# four INFO lines a batch (warm-up, thread start and stop): the policy logs its own line per batch
logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)


def paged_unavailable() -> str | None:
    """Why policy.kv_cache = paged cannot run with the installed transformers (None: it can)."""
    if hasattr(transformers, "ContinuousBatchingConfig"):
        return None
    return (
        f"policy.kv_cache 'paged' needs transformers 5's continuous batching (ContinuousBatchingConfig); "
        f"transformers {transformers.__version__} is installed: use 'dynamic' or 'static', or transformers >= 5.17"
    )


def paged_config(rows: list[list[int]], max_new_tokens: int, max_tokens_per_forward: int, seed: int | None):
    """The continuous-batching settings for one batch: every row in flight at once, its cache sized
    for these rows (see the module's docstring), at most max_tokens_per_forward tokens a forward."""
    positions = max(len(row) for row in rows) + max_new_tokens
    return transformers.ContinuousBatchingConfig(
        block_size=BLOCK_SIZE,
        num_blocks=len(rows) * math.ceil(positions / BLOCK_SIZE),
        max_batch_tokens=max(BLOCK_SIZE, min(max_tokens_per_forward, len(rows) * positions)),
        max_requests_per_batch=len(rows),
        allow_block_sharing=False,  # no prefix caching: samples of one prompt share it, but each batch is new
        seed=seed,
    )


def sample_paged(
    model: PreTrainedModel,
    rows: list[list[int]],
    config: GenerationConfig,
    max_tokens_per_forward: int,
    seed: int | None = None,
) -> list[list[int]]:
    """The tokens sampled after each row's prompt (an EOS included, as `generate()` gives it), in the
    rows' order. Raises RuntimeError when a row comes back missing or failed: `generate_batch` logs
    its errors (an out-of-memory among them) and returns what finished, which must not pass for a
    whole batch."""
    cb_config = paged_config(rows, config.max_new_tokens, max_tokens_per_forward, seed)
    results = model.generate_batch(
        inputs=rows, generation_config=config, continuous_batching_config=cb_config, progress_bar=False
    )
    outputs = list(results.values())
    failed = [output.error for output in outputs if output.error is not None]
    if len(outputs) != len(rows) or failed:
        raise RuntimeError(
            f"continuous batching returned {len(outputs)} of {len(rows)} rows"
            + (f", {len(failed)} failed: {failed[0]}" if failed else "")
        )
    for index, (row, output) in enumerate(zip(rows, outputs)):
        if list(output.prompt_ids) != list(row):
            raise RuntimeError(f"continuous batching returned row {index} for another prompt")
    return [list(output.generated_tokens) for output in outputs]
