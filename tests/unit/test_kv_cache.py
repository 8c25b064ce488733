"""policy.kv_cache: static (services/policy/kv_cache.py) on a tiny real Llama: behaviour log-probs equal
to a teacher-forced pass, the same samples as the dynamic cache, hot-swaps (full weights and LoRA
adapters) served by the next batch, and the decode step compiled by Dynamo without a recompile.
The hot swaps are tested on paged too (under transformers 5: tests/unit/test_paged_sampling.py)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from services.common.checkpoints import write_checkpoint
from services.common.config import GrpcConfig, PolicyConfig
from services.common.lora import LoraSettings, adapter_tensors, wrap_with_lora
from services.common.models import load_causal_lm, load_tokenizer
from services.policy.engine import PolicyEngine, Sampling
from services.policy.kv_cache import SamplingCache, resolve_kv_cache
from services.policy.paged_sampling import paged_unavailable
from tests.tiny_models import llama_config

# ragged: the chat template makes them 11 to 17 tokens, so rows are left-padded differently
PROMPTS = ["Hi", "How are you feeling today?", "Describe a walk in the park and the weather."]
MAX_PROMPT_TOKENS = 40
REPO = pathlib.Path(__file__).resolve().parents[2]
# paged runs where transformers 5 is installed (make test-transformers5); skipped under the 4.57 pin
needs_paged = pytest.mark.skipif(paged_unavailable() is not None, reason="continuous batching needs transformers 5")
SWAPPED_CACHES = ["static", pytest.param("paged", marks=needs_paged)]  # the caches a hot swap is tested on


def teacher_forced(model, prompt: list[int], response: list[int], temperature: float) -> list[float]:
    """log softmax(logits / T)[token] at the positions that predict the response: one unpadded
    forward of the row alone, no cache, float64 softmax."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature  # (T, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    return [log_probs[len(prompt) + k - 1, token].item() for k, token in enumerate(response)]


def assert_teacher_forced(batch, model, temperature: float) -> None:
    for prompt, response, logprobs in zip(batch.prompt_ids, batch.response_ids, batch.logprobs):
        assert len(logprobs) == len(response)
        assert logprobs == pytest.approx(teacher_forced(model, prompt, response, temperature or 1.0), abs=1e-5)


def assert_same_rows(batch, other) -> None:
    """The same tokens and endings, and the same log-probs up to float rounding."""
    assert batch.response_ids == other.response_ids
    assert batch.finish_reasons == other.finish_reasons
    for a, b in zip(batch.logprobs, other.logprobs):
        assert a == pytest.approx(b, abs=1e-5)


def engine_on(model, tiny_lm_dir, kv_cache: str, **options) -> PolicyEngine:
    return PolicyEngine(
        model,
        load_tokenizer(str(tiny_lm_dir)),
        GrpcConfig(),
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        kv_cache=kv_cache,
        **options,
    )


def tiny_lm(tiny_lm_dir):
    return load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy")


@pytest.fixture(scope="module")
def engines(tiny_lm_dir):
    return {kind: engine_on(tiny_lm(tiny_lm_dir), tiny_lm_dir, kind) for kind in ("dynamic", "static")}


def test_an_unknown_kv_cache_is_refused_by_name():
    with pytest.raises(ValueError, match="policy.kv_cache must be one of auto, dynamic, static, paged, got .paging."):
        SamplingCache("paging")


def test_auto_is_the_default_and_means_static_on_cuda_and_dynamic_elsewhere():
    assert PolicyConfig.model_fields["kv_cache"].default == "auto"
    assert [resolve_kv_cache("auto", device) for device in ("cuda", "cuda:1", torch.device("cpu"), "mps")] == [
        "static", "static", "dynamic", "dynamic",
    ]  # fmt: skip
    assert [resolve_kv_cache(name, "cuda:0") for name in ("dynamic", "paged")] == ["dynamic", "paged"]  # as named


def test_an_engine_on_the_cpu_left_at_auto_samples_with_the_dynamic_cache(tiny_lm_dir):
    engine = PolicyEngine(tiny_lm(tiny_lm_dir), load_tokenizer(str(tiny_lm_dir)), GrpcConfig(), kv_cache="auto")
    engine.generate(PROMPTS[:1], 1, Sampling(max_new_tokens=3, seed=1))
    assert engine.sampling_cache.kind == "dynamic" and engine.sampling_cache.cache is None  # no StaticCache made


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_static_cache_samples_what_the_dynamic_one_does_with_teacher_forced_logprobs(engines, temperature):
    """Same seed, same tokens: both caches give the sampler the same logits up to float rounding (the
    static one attends over masked empty positions too), so the same random draws pick the same tokens."""
    sampling = Sampling(temperature=temperature, top_p=0.9, max_new_tokens=12, seed=21)
    dynamic = engines["dynamic"].generate(PROMPTS, 2, sampling)
    static = engines["static"].generate(PROMPTS, 2, sampling)
    assert_same_rows(static, dynamic)
    assert_teacher_forced(static, engines["static"].loaded.model, temperature)


def test_one_static_cache_serves_every_batch_of_a_shape_and_another_shape_gets_its_own(engines):
    engine, model = engines["static"], engines["static"].loaded.model
    cache = engine.sampling_cache
    engine.generate(PROMPTS, 2, Sampling(max_new_tokens=10, seed=1))
    first = cache.cache
    assert cache.shape == (6, MAX_PROMPT_TOKENS + 10)  # sized from the prompt limit, not this batch's width
    batch = engine.generate(PROMPTS[:1], 6, Sampling(max_new_tokens=10, seed=2))  # 6 rows, narrower prompts
    assert cache.cache is first  # zeroed and reused: what keeps a compiled decode step's shapes
    assert_teacher_forced(batch, model, 1.0)  # nothing left over from the longer rows before
    batch = engine.generate(PROMPTS[:2], 1, Sampling(max_new_tokens=5, seed=3))
    assert cache.cache is not first and cache.shape == (2, MAX_PROMPT_TOKENS + 5)
    assert_teacher_forced(batch, model, 1.0)


def test_a_model_config_asking_for_a_repetition_penalty_cannot_get_before_the_recorder(tiny_lm_dir):
    """transformers applies a model's generation_config.json defaults (here a repetition penalty, which
    would warp the logits the recorder reads) unless generate() is told not to."""
    model = tiny_lm(tiny_lm_dir)
    model.generation_config.repetition_penalty = 3.0
    engine = engine_on(model, tiny_lm_dir, "static")
    batch = engine.generate(PROMPTS, 1, Sampling(temperature=1.0, max_new_tokens=10, seed=4))
    assert_teacher_forced(batch, model, 1.0)


def swapped_in(engine: PolicyEngine, tmp_path, tiny_lm_dir, seed: int) -> LlamaForCausalLM:
    """A new model of the same shape, committed as version 1 and swapped into the engine in place."""
    new = LlamaForCausalLM(llama_config(load_tokenizer(str(tiny_lm_dir))))
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in new.parameters():
            parameter.normal_(0, 0.2)
    path = write_checkpoint(tmp_path / "ckpt", 1, lambda d: new.save_pretrained(d, safe_serialization=True))
    engine.swap_to(1, path)
    return new.eval()


@pytest.mark.parametrize("kv_cache", SWAPPED_CACHES)
def test_a_batch_after_a_hot_swap_samples_from_the_new_weights(tiny_lm_dir, tmp_path, kv_cache):
    engine = engine_on(tiny_lm(tiny_lm_dir), tiny_lm_dir, kv_cache)
    old = tiny_lm(tiny_lm_dir)
    sampling = Sampling(temperature=0.7, max_new_tokens=8, seed=5)
    assert_teacher_forced(engine.generate(PROMPTS, 2, sampling), old, 0.7)
    new = swapped_in(engine, tmp_path, tiny_lm_dir, seed=6)
    batch = engine.generate(PROMPTS, 2, sampling)
    assert batch.version == 1
    assert_teacher_forced(batch, new, 0.7)
    prompt, response = batch.prompt_ids[0], batch.response_ids[0]
    assert teacher_forced(old, prompt, response, 0.7) != pytest.approx(batch.logprobs[0], abs=1e-3)


@pytest.mark.parametrize("kv_cache", SWAPPED_CACHES)
def test_lora_adapters_swapped_in_serve_the_next_batch(tiny_lm_dir, kv_cache):
    settings = LoraSettings(r=4, alpha=8)
    engine = engine_on(wrap_with_lora(tiny_lm(tiny_lm_dir), settings), tiny_lm_dir, kv_cache)
    trained = wrap_with_lora(tiny_lm(tiny_lm_dir), settings)
    torch.manual_seed(7)
    with torch.no_grad():
        for tensor in adapter_tensors(trained).values():
            tensor.normal_(0, 0.3)  # lora_B leaves zero: the adapters now change the forward
    sampling = Sampling(temperature=1.0, max_new_tokens=8, seed=8)
    engine.generate(PROMPTS, 1, sampling)
    engine.swap_to(1, {name: tensor.clone() for name, tensor in adapter_tensors(trained).items()})
    batch = engine.generate(PROMPTS, 1, sampling)
    assert batch.version == 1
    assert_teacher_forced(batch, trained.eval(), 1.0)


def test_a_compiled_decode_step_keeps_exact_logprobs_and_a_hot_swap_does_not_recompile(tiny_lm_dir, tmp_path):
    """In a process of its own (tests/unit/compiled_decode.py): Dynamo's state, fake tensors included,
    outlives torch._dynamo.reset() and would meet the tests that walk every live tensor."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.unit.compiled_decode", str(tiny_lm_dir), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exact before and after the swap" in done.stdout
