"""policy.kv_cache: paged (services/policy/paged_sampling.py): transformers 5's continuous batching on a
tiny real Llama. Behaviour log-probs equal an independent teacher-forced pass, greedy rows equal the
dynamic cache's, top-p and max_new_tokens reach the sampler, a seed repeats a batch, and a failed row
fails the call. Hot swaps (full weights, LoRA adapters): tests/unit/test_kv_cache.py.

These run under transformers 5 (the GPU machine's 5.17): `make test` runs them a second time in a
side environment that has it (`make test-transformers5`). Under the project's pin (4.57) they are
skipped, and the refusal at start is tested instead.
"""

from __future__ import annotations

import pytest
import transformers

from services.common.memory_plan import model_shape
from services.common.paged_plan import BLOCK_POSITIONS, paged_batch_tokens
from services.policy.engine import Sampling
from services.policy.kv_cache import SamplingCache
from services.policy.paged_sampling import paged_config, paged_unavailable, sample_paged
from tests.unit.test_kv_cache import (
    PROMPTS,
    assert_same_rows,
    assert_teacher_forced,
    engine_on,
    needs_paged,
    tiny_lm,
)


@pytest.mark.skipif(paged_unavailable() is None, reason="transformers 5 runs it")
def test_paged_is_refused_at_start_under_transformers_4_naming_the_setting_and_version():
    with pytest.raises(ValueError, match=f"policy.kv_cache 'paged'.*transformers {transformers.__version__}"):
        SamplingCache("paged")
    assert paged_unavailable() is not None


@pytest.fixture(scope="module")
def engines(tiny_lm_dir):  # used by needs_paged tests only
    return {kind: engine_on(tiny_lm(tiny_lm_dir), tiny_lm_dir, kind) for kind in ("dynamic", "paged")}


@needs_paged
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_paged_behaviour_logprobs_equal_a_teacher_forced_pass(engines, temperature):
    batch = engines["paged"].generate(PROMPTS, 3, Sampling(temperature=temperature, max_new_tokens=12, seed=11))
    assert [len(response) for response in batch.response_ids] == [len(row) for row in batch.logprobs]
    assert all(1 <= len(response) <= 12 for response in batch.response_ids)
    assert len({tuple(response) for response in batch.response_ids}) > 1  # sampled, not one row repeated
    assert_teacher_forced(batch, engines["paged"].loaded.model, temperature)
    assert batch.logprob_seconds > 0  # the pass of its own is timed apart from the sampling


@needs_paged
def test_greedy_paged_rows_equal_the_dynamic_cache_rows(engines):
    """Rows of unequal prompts packed together must attend to their own tokens only: greedy answers
    (no random draw) match generate()'s left-padded ones token for token."""
    sampling = Sampling(temperature=0.0, max_new_tokens=10)
    paged = engines["paged"].generate(PROMPTS, 1, sampling)
    dynamic = engines["dynamic"].generate(PROMPTS, 1, sampling)
    assert_same_rows(paged, dynamic)


@needs_paged
def test_rows_that_sample_eos_end_there_as_the_dynamic_cache_rows_do(eager_eos_lm_dir):
    """A model that says EOS early: greedy rows end at it ("eos", the EOS kept), the same rows as
    generate()'s, and rows that run out of tokens are "length"."""
    paged = engine_on(tiny_lm(eager_eos_lm_dir), eager_eos_lm_dir, "paged")
    dynamic = engine_on(tiny_lm(eager_eos_lm_dir), eager_eos_lm_dir, "dynamic")
    sampling = Sampling(temperature=0.0, max_new_tokens=6)
    batch = paged.generate(PROMPTS, 1, sampling)
    assert "eos" in batch.finish_reasons
    assert batch.response_ids == dynamic.generate(PROMPTS, 1, sampling).response_ids
    for response, reason in zip(batch.response_ids, batch.finish_reasons):
        assert (response[-1] in paged.eos_ids) == (reason == "eos")
        assert reason == "eos" or len(response) == 6
    assert_teacher_forced(batch, paged.loaded.model, 1.0)


@needs_paged
def test_a_tiny_top_p_leaves_the_likeliest_token_only(engines):
    """top_p reaches continuous batching's own processors (it drops the ones it does not support)."""
    greedy = engines["paged"].generate(PROMPTS, 1, Sampling(temperature=0.0, max_new_tokens=8))
    nucleus = engines["paged"].generate(PROMPTS, 2, Sampling(temperature=1.0, top_p=1e-6, max_new_tokens=8, seed=3))
    assert nucleus.response_ids == [row for row in greedy.response_ids for _ in range(2)]


@needs_paged
def test_a_seed_repeats_a_paged_batch_and_another_seed_does_not(engines):
    sampling = Sampling(temperature=1.0, max_new_tokens=10, seed=5)
    first = engines["paged"].generate(PROMPTS, 2, sampling)
    again = engines["paged"].generate(PROMPTS, 2, sampling)
    other = engines["paged"].generate(PROMPTS, 2, Sampling(temperature=1.0, max_new_tokens=10, seed=6))
    assert again.response_ids == first.response_ids
    assert other.response_ids != first.response_ids


@needs_paged
def test_the_paged_cache_is_sized_for_the_batch_in_whole_blocks_per_row(tiny_lm_dir):
    """The sampler sizes each batch with the memory plan's functions (services/common/paged_plan.py,
    whose arithmetic tests/unit/test_paged_plan.py checks), by the model's own attention."""
    model = tiny_lm(tiny_lm_dir)
    rows = [[1] * 70, [2] * 10, [3] * 5]  # widest 70 + 60 new = 130 positions: 3 blocks of 64 a row
    config = paged_config(model, rows, 60, max_tokens_per_forward=16384, seed=9)
    assert (config.block_size, config.num_blocks) == (BLOCK_POSITIONS, 3 * 3)
    assert model.config._attn_implementation == "sdpa"  # continuous batching masks it: the bound applies
    shape = model_shape(model.config.to_dict())
    assert config.max_batch_tokens == paged_batch_tokens(shape, 3, 130, 16384, masked=True) < 3 * 130
    assert config.max_requests_per_batch == 3
    model.config._attn_implementation = "flash_attention_2"  # no mask (set, not run: no flash-attn here)
    try:
        assert paged_config(model, rows, 60, max_tokens_per_forward=16384, seed=None).max_batch_tokens == 3 * 130
        assert paged_config(model, rows, 60, max_tokens_per_forward=100, seed=None).max_batch_tokens == 100
    finally:
        model.config._attn_implementation = "sdpa"


@needs_paged
def test_a_row_that_fails_in_the_batch_fails_the_whole_call(tiny_lm_dir):
    """generate_batch logs a failing forward and returns what finished: sample_paged must not pass
    that off as a batch. A token id past the vocabulary fails the embedding lookup, a real error."""
    model = tiny_lm(tiny_lm_dir)
    vocab = model.get_input_embeddings().num_embeddings
    config = transformers.GenerationConfig(do_sample=True, top_k=0, max_new_tokens=4, pad_token_id=0, eos_token_id=[1])
    assert len(sample_paged(model, [[5, 6, 7], [8, 9]], config, 16384, seed=1)) == 2
    with pytest.raises(RuntimeError, match="continuous batching returned"):
        sample_paged(model, [[5, 6, 7], [vocab + 10]], config, 16384, seed=1)
