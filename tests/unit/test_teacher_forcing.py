"""build_teacher_forced_batch and response_logprobs (services/common/models.py) on a tiny real Llama."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.models import build_teacher_forced_batch, load_causal_lm, response_logprobs
from services.common.token_logprobs import model_response_stats

PAD = 0
# ragged rows: prompts and responses of different lengths, shortest row not first
PROMPTS = [[5, 17, 42, 9], [7], [11, 12, 13, 14, 15, 16, 20], [30, 31]]
RESPONSES = [[100, 101], [60, 61, 62, 63, 64, 65], [70], [80, 81, 82]]


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    torch.set_num_threads(1)
    return load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "tiny test model")


def test_response_mask_covers_exactly_the_positions_that_predict_response_tokens():
    input_ids, attention_mask, response_mask = build_teacher_forced_batch(PROMPTS, RESPONSES, PAD, torch.device("cpu"))
    width = max(len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES))
    assert input_ids.shape == (4, width)
    assert attention_mask.shape == (4, width)
    assert response_mask.shape == (4, width - 1)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        first, last = len(prompt) - 1, len(prompt) + len(response) - 2
        expected_mask = [1.0 if first <= t <= last else 0.0 for t in range(width - 1)]
        assert response_mask[row].tolist() == expected_mask, row
        # each masked position t predicts token t+1, which is exactly the response in order
        predicted = [input_ids[row, t + 1].item() for t in range(width - 1) if expected_mask[t]]
        assert predicted == response
        sequence = prompt + response
        assert input_ids[row].tolist() == sequence + [PAD] * (width - len(sequence))
        assert attention_mask[row].tolist() == [1] * len(sequence) + [0] * (width - len(sequence))


def test_response_mask_is_float_and_input_ids_are_long():
    input_ids, attention_mask, response_mask = build_teacher_forced_batch([[1, 2]], [[3]], PAD, torch.device("cpu"))
    assert input_ids.dtype == torch.long
    assert attention_mask.dtype == torch.long
    assert response_mask.dtype == torch.float32
    assert response_mask.tolist() == [[0.0, 1.0]]


def independent_response_logprobs(model, prompt, response, temperature):
    """The row alone, no padding, no mask: log_softmax(logits / T) at the positions that predict the response."""
    ids = torch.tensor([prompt + response], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    values = []
    for k, token in enumerate(response):
        position = len(prompt) - 1 + k
        row = logits[position] / temperature
        log_z = torch.logsumexp(row, dim=0)
        values.append((row[token] - log_z).item())
    return values


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_equal_each_row_run_alone(tiny_lm, temperature):
    got = response_logprobs(tiny_lm, PROMPTS, RESPONSES, PAD, temperature=temperature)
    assert len(got) == len(PROMPTS)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        expected = independent_response_logprobs(tiny_lm, prompt, response, temperature)
        assert got[row].shape == (len(response),)
        assert got[row].tolist() == pytest.approx(expected, abs=1e-5), row


def test_temperature_changes_the_logprobs(tiny_lm):
    hot = response_logprobs(tiny_lm, PROMPTS, RESPONSES, PAD, temperature=1.0)
    cold = response_logprobs(tiny_lm, PROMPTS, RESPONSES, PAD, temperature=0.7)
    assert any(not torch.allclose(h, c, atol=1e-4) for h, c in zip(hot, cold))


@pytest.mark.parametrize("max_tokens", [1, 10, 16])
def test_chunked_forwards_give_the_same_logprobs(tiny_lm, max_tokens):
    whole = response_logprobs(tiny_lm, PROMPTS, RESPONSES, PAD, temperature=0.7)
    chunked = response_logprobs(tiny_lm, PROMPTS, RESPONSES, PAD, temperature=0.7, max_tokens_per_forward=max_tokens)
    assert len(chunked) == len(whole)
    for row, (a, b) in enumerate(zip(whole, chunked)):
        assert b.shape == a.shape
        assert b.tolist() == pytest.approx(a.tolist(), abs=1e-5), row


def test_response_logprobs_are_valid_log_probabilities_without_grad(tiny_lm):
    got = response_logprobs(tiny_lm, PROMPTS, RESPONSES, PAD)
    for values in got:
        assert not values.requires_grad
        assert bool((values <= 0).all())
        assert bool(torch.isfinite(values).all())


def test_token_logprobs_entropy_matches_hand_formula(tiny_lm):
    input_ids, attention_mask, _ = build_teacher_forced_batch(PROMPTS[:1], RESPONSES[:1], PAD, torch.device("cpu"))
    every_position = torch.ones(1, input_ids.shape[1] - 1)
    with torch.no_grad():
        stats, _ = model_response_stats(tiny_lm, input_ids, attention_mask, every_position, 0.7, chunk_positions=3)
        chosen, entropy = stats.logprobs, stats.entropy
        logits = tiny_lm(input_ids=input_ids).logits[0].double() / 0.7
    for position in range(input_ids.shape[1] - 1):
        probs = torch.softmax(logits[position], dim=0)
        expected_entropy = -sum(p * math.log(p) for p in probs.tolist() if p > 0)
        assert entropy[0, position].item() == pytest.approx(expected_entropy, abs=1e-4)
        next_token = input_ids[0, position + 1].item()
        assert chosen[0, position].item() == pytest.approx(torch.log(probs[next_token]).item(), abs=1e-5)


@pytest.mark.parametrize(
    "max_tokens, expected_batches", [(16, [2, 2]), (30, [3, 1]), (12, [1, 1, 1, 1]), (1, [1, 1, 1, 1]), (16384, [4])]
)
def test_forwards_stay_under_the_token_budget(tiny_lm, max_tokens, expected_batches):
    # rows are 6, 7, 8 and 5 tokens long; a row longer than the budget still goes alone
    shapes = []
    handle = tiny_lm.get_decoder().register_forward_pre_hook(  # the head runs apart, on response positions
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        response_logprobs(tiny_lm, PROMPTS, RESPONSES, PAD, max_tokens_per_forward=max_tokens)
    finally:
        handle.remove()
    assert [rows for rows, _ in shapes] == expected_batches
    for rows, width in shapes:
        assert rows == 1 or rows * width <= max_tokens
