"""services/policy/nucleus.py: temperature and top-p by a window of candidates against transformers'
own TemperatureLogitsWarper and TopPLogitsWarper (the same logits out, -inf where they filter), with
rows whose nucleus spills past the window sent through the full sort, and the rule against its
formula on a hand-made distribution."""

from __future__ import annotations

import math

import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from services.common.config import GrpcConfig
from services.common.models import load_causal_lm, load_tokenizer
from services.policy import nucleus
from services.policy.engine import PolicyEngine, Sampling
from services.policy.nucleus import WindowedTopP
from services.policy.policy_metrics import PolicyMetrics

VOCAB = 5000


def transformers_warpers(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    scores = TemperatureLogitsWarper(temperature)(None, scores) if temperature != 1.0 else scores
    return TopPLogitsWarper(top_p)(None, scores) if top_p < 1.0 else scores


def logits(rows: int, scale: float, seed: int) -> torch.Tensor:
    """scale 6: a peaked distribution (a nucleus of a few tokens); 0.1: a nearly flat one."""
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_peaked_rows_are_settled_in_the_window_as_the_full_sort_settles_them(temperature, top_p):
    scores = logits(64, 6.0, seed=1)
    windowed = WindowedTopP(temperature, top_p, window=256)
    out = windowed(torch.zeros(64, 1, dtype=torch.long), scores)
    assert windowed.fallback_rows == 0 and windowed.rows == 64  # the premise: no row needed the sort
    assert torch.equal(out, transformers_warpers(scores, temperature, top_p))
    assert 1 <= int(torch.isfinite(out).sum(-1).min()) and int(torch.isfinite(out).sum(-1).max()) < 256


def test_flat_rows_spill_past_the_window_and_take_the_full_sort():
    scores = logits(8, 0.1, seed=2)
    windowed = WindowedTopP(1.0, 0.9, window=256)
    out = windowed(torch.zeros(8, 1, dtype=torch.long), scores)
    assert windowed.fallback_rows == 8
    assert torch.equal(out, transformers_warpers(scores, 1.0, 0.9))
    assert int(torch.isfinite(out).sum(-1).min()) > 256  # nuclei the window could not hold


def test_a_batch_mixing_both_kinds_of_row_sorts_only_the_spilled_ones():
    scores = torch.cat([logits(5, 6.0, seed=3), logits(3, 0.1, seed=4)])[torch.tensor([0, 5, 1, 6, 2, 3, 7, 4])]
    windowed = WindowedTopP(0.8, 0.9, window=128)
    out = windowed(torch.zeros(8, 1, dtype=torch.long), scores)
    assert (windowed.fallback_rows, windowed.rows) == (3, 8)
    assert torch.equal(out, transformers_warpers(scores, 0.8, 0.9))


def test_the_kept_set_is_the_likeliest_tokens_until_the_mass_before_the_next_reaches_top_p():
    probs = [0.05, 0.5, 0.15, 0.3]  # by likelihood: token 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    scores = torch.tensor([[math.log(p) for p in probs]])
    for top_p, kept in [(0.4, {1}), (0.7, {1, 3}), (0.85, {1, 3, 2}), (0.99, {0, 1, 2, 3})]:
        out = WindowedTopP(1.0, top_p, window=4)(torch.zeros(1, 1, dtype=torch.long), scores)
        assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == kept, top_p


def test_top_p_one_only_divides_by_the_temperature():
    scores = logits(4, 1.0, seed=5)
    out = WindowedTopP(0.5, 1.0, window=16)(torch.zeros(4, 1, dtype=torch.long), scores)
    assert torch.equal(out, scores / 0.5)


@pytest.mark.parametrize(
    "temperature, top_p, window, message",
    [(0.0, 0.9, 8, "temperature"), (1.0, 0.0, 8, "top_p"), (1.0, 1.5, 8, "top_p"), (1.0, 0.9, 0, "top_p_window")],
)
def test_arguments_out_of_range_are_refused_by_name(temperature, top_p, window, message):
    with pytest.raises(ValueError, match=message):
        WindowedTopP(temperature, top_p, window)


class CountingWarper(TopPLogitsWarper):
    rows = 0

    def __call__(self, input_ids, scores):
        CountingWarper.rows += scores.shape[0]
        return super().__call__(input_ids, scores)


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_the_engine_samples_the_same_tokens_and_logprobs_with_the_window_as_with_transformers_warpers(
    tiny_lm_dir, monkeypatch, kv_cache
):
    """Same seed, same draws: the window changes how the nucleus is found, not what it is. A window as
    wide as the vocabulary settles every row (no full sort); a window of one spills nearly all."""
    model = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy")
    engine = PolicyEngine(
        model, load_tokenizer(str(tiny_lm_dir)), GrpcConfig(), max_prompt_tokens=32, kv_cache=kv_cache
    )
    monkeypatch.setattr(nucleus, "TopPLogitsWarper", CountingWarper)
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=11)
    batches, metrics = {}, PolicyMetrics(CollectorRegistry())
    for window in (0, engine.vocab_size, 1):
        engine.top_p_window, CountingWarper.rows = window, 0
        batches[window] = batch = engine.generate(["Hi", "Tell me about rivers."], 2, sampling)
        metrics.observe_generation(batch)
        assert batch.top_p_sorted_rows == CountingWarper.rows  # the rows the fallback sorted, counted
        steps = max(len(r) for r in batch.response_ids)
        assert batch.top_p_rows == (0 if window == 0 else 4 * steps)  # 4 rows a step, each step filtered
        if window == engine.vocab_size:
            assert batch.top_p_sorted_rows == 0  # every row settled in the window
        if window == 1:
            assert batch.top_p_sorted_rows > 0
    exported = {
        name: metrics.registry.get_sample_value(name)
        for name in ("belay_policy_top_p_rows_total", "belay_policy_top_p_sorted_rows_total")
    }
    assert exported == {
        "belay_policy_top_p_rows_total": sum(b.top_p_rows for b in batches.values()),
        "belay_policy_top_p_sorted_rows_total": sum(b.top_p_sorted_rows for b in batches.values()),
    }
    for window in (engine.vocab_size, 1):
        assert batches[window].response_ids == batches[0].response_ids
        assert batches[window].logprobs == batches[0].logprobs  # the recorder reads the raw logits either way
