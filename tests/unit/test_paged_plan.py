"""services/common/paged_plan.py: the memory of policy.kv_cache = paged (issue #14), against its formulas
written out here, and through config_plans as `belay up` and each service read it. Pure arithmetic:
runs under transformers 4.57 too (the sampler that uses it: tests/unit/test_paged_sampling.py)."""

from __future__ import annotations

import pytest

from services.common.memory_check import config_plans
from services.common.memory_plan import CUDA_CONTEXT_BYTES, model_shape, policy_plan
from services.common.paged_plan import (
    BLOCK_POSITIONS,
    paged_batch_tokens,
    paged_mask_bytes,
    paged_policy_plan,
    paged_positions,
)
from tests.unit.test_memory_plan import QWEN25_15B, TINY, four_services

QWEN = model_shape(QWEN25_15B)
PER_POSITION = 2 * 28 * 2 * 128  # keys and values, 28 layers, 2 KV heads of 128: the cache's elements a position


def test_the_cache_holds_whole_blocks_a_row():
    assert BLOCK_POSITIONS == 64
    assert paged_positions(3, 130) == 3 * 192  # 130 positions take 3 blocks of 64
    assert paged_positions(256, 192) == 256 * 192  # exactly 3 blocks
    assert paged_positions(1, 1) == 64


@pytest.mark.parametrize("rows, width", [(256, 192), (512, 1152), (8, 1152), (64, 640)])
def test_with_a_mask_a_forward_holds_the_most_tokens_whose_mask_is_no_bigger_than_the_cache(rows, width):
    positions = paged_positions(rows, width)
    tokens = paged_batch_tokens(QWEN, rows, width, 10**9, masked=True)
    mask, cache = tokens * (positions + tokens), PER_POSITION * positions  # elements
    assert rows < tokens < rows * width  # bound by the mask: neither the floor nor the batch's tokens
    assert mask <= cache < (tokens + 1) * (positions + tokens + 1)  # the largest such M


def test_the_bench_batch_and_the_default_prompt_limit_against_16384_tokens_a_forward():
    # the GPU bench: 256 rows of 64 prompt + 128 new tokens. 16,384 tokens a forward made a 2.1 GB mask
    assert paged_batch_tokens(QWEN, 256, 192, 16384, masked=False) == 16384
    bounded = paged_batch_tokens(QWEN, 256, 192, 16384, masked=True)
    assert 11_000 < bounded < 12_000
    assert paged_mask_bytes(QWEN, 256, 192, 16384, 2) <= PER_POSITION * 256 * 192 * 2 < 16384 * (49152 + 16384) * 2
    # 512 rows at the default 1,024-token prompt limit: 16,384 tokens a forward would mask 19.9 GB
    rows, width = 512, 1024 + 128
    assert 16384 * (paged_positions(rows, width) + 16384) * 2 > 19.8e9
    assert paged_mask_bytes(QWEN, rows, width, 16384, 2) <= PER_POSITION * paged_positions(rows, width) * 2


def test_the_limits_and_floors():
    assert paged_batch_tokens(QWEN, 4, 100, 10**9, masked=False) == 400  # never more than the batch's tokens
    assert paged_batch_tokens(QWEN, 256, 192, 1000, masked=True) == 1000  # max_tokens_per_forward is a ceiling
    assert paged_batch_tokens(QWEN, 2, 8, 16384, masked=False) == 64  # at least one block
    tiny = model_shape(TINY)  # 2 layers, 2 KV heads of 8: 64 elements a position, a bound under the rows
    assert paged_batch_tokens(tiny, 200, 512, 16384, masked=True) == 200  # one decode step still holds every row


def test_the_paged_policy_plan_follows_its_formulas():
    rows, prompt, new, limit = 256, 64, 128, 16384
    positions, tokens = paged_positions(rows, prompt + new), paged_batch_tokens(QWEN, rows, prompt + new, limit, True)
    plan = paged_policy_plan(QWEN, 2, rows, prompt, new, "cuda:0", limit, masked=True, logprob_positions=512)
    items = {item.name: item.bytes for item in plan.items}
    plain = {item.name: item.bytes for item in policy_plan(QWEN, 2, rows, prompt, new, "cuda:0").items}
    assert items["policy weights"] == plain["policy weights"]
    assert items["policy logits per step"] == plain["policy logits per step"] == rows * 151936 * 4
    assert items["policy KV cache"] == PER_POSITION * positions * 2
    assert items["policy paged attention mask"] == tokens * (positions + tokens) * 2
    assert items["policy prefill activations"] == min(tokens, rows * prompt) * 1536 * 34  # 34 bytes at 16-bit
    assert items["policy log-prob pass activations"] == 16384 * 1536 * 34  # min(limit, rows x width) tokens
    assert items["policy log-prob chunk"] == 512 * 151936 * 4 * 4
    assert items["CUDA context (assumed)"] == CUDA_CONTEXT_BYTES and plan.total_bytes == sum(items.values())
    flash = paged_policy_plan(QWEN, 2, rows, prompt, new, "cuda:0", limit, masked=False, logprob_positions=512)
    assert "policy paged attention mask" not in {item.name for item in flash.items}


def test_config_plans_plan_a_paged_policy_by_its_attention(tmp_path):
    config = four_services(tmp_path)  # 8 rows of 1,024 prompt + 128 new tokens, sdpa ('auto' without flash-attn)
    dynamic = {i.name: i.bytes for p in config_plans(config, True)[0] if p.service == "policy" for i in p.items}
    config.policy.kv_cache = "paged"
    paged = {i.name: i.bytes for p in config_plans(config, True)[0] if p.service == "policy" for i in p.items}
    assert "policy paged attention mask" not in dynamic
    assert paged["policy paged attention mask"] == paged_mask_bytes(QWEN, 8, 1152, 16384, 2)  # bfloat16 on CUDA
    assert paged["policy KV cache"] == dynamic["policy KV cache"] * paged_positions(8, 1152) // (8 * 1152)
    config.policy.attn_implementation = "flash_attention_2"
    flash = {i.name for p in config_plans(config, True)[0] if p.service == "policy" for i in p.items}
    assert "policy paged attention mask" not in flash and "policy log-prob chunk" in flash
