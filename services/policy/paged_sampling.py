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

The paged cache and the tokens a forward holds are sized here, not by transformers' default
(which takes 90 % of the device's free memory, and four services may share it), by the functions
the memory plan counts them with (services/common/paged_plan.py): rows x (widest prompt +
max_new_tokens) positions, rounded up to whole blocks per row; at most max_tokens_per_forward
tokens a forward, fewer where the attention needs a mask (any but flash_attention_2), which
continuous batching allocates at max_batch_tokens x (cache positions + max_batch_tokens): bounded
so that it is no bigger than the cache.
"""

from __future__ import annotations

import logging

import transformers
from transformers import GenerationConfig, PreTrainedModel

from ..common.memory_plan import model_shape
from ..common.paged_plan import BLOCK_POSITIONS, paged_batch_tokens, paged_positions

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


def paged_config(
    model: PreTrainedModel, rows: list[list[int]], max_new_tokens: int, max_tokens_per_forward: int, seed: int | None
):
    """The continuous-batching settings for one batch: every row in flight at once, its cache sized
    for these rows and its forwards' tokens bounded (see the module's docstring)."""
    width = max(len(row) for row in rows) + max_new_tokens
    masked = "flash" not in model.config._attn_implementation  # flash reads the block table, no mask
    try:
        shape = model_shape(model.config.to_dict())
    except KeyError as missing:
        raise ValueError(
            f"policy.kv_cache 'paged' sizes its batches from the model's config, which lacks {missing}"
        ) from None
    tokens = paged_batch_tokens(shape, len(rows), width, max_tokens_per_forward, masked)
    return transformers.ContinuousBatchingConfig(
        block_size=BLOCK_POSITIONS,
        num_blocks=paged_positions(len(rows), width) // BLOCK_POSITIONS,
        max_batch_tokens=tokens,
        max_requests_per_batch=min(len(rows), tokens),
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
    cb_config = paged_config(model, rows, config.max_new_tokens, max_tokens_per_forward, seed)
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
