"""Chunked response log-probs (services/common/token_logprobs.py) against a full log_softmax over the
whole (B, T-1, V), written here independently, on tiny Llama and Qwen2 models (tied and untied head)
and a LoRA-wrapped Llama: values, gradients, masked positions, and how much the head ever sees."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from services.common.lora import LoraSettings, wrap_with_lora
from services.common.models import build_teacher_forced_batch
from services.common.token_logprobs import (
    chunked_head_refusal,
    decoder_hidden,
    model_response_stats,
    model_response_top_k,
    response_token_stats,
    response_top_k,
)

VOCAB = 512
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
# ragged rows: right padding, prompts and responses of different lengths
PROMPTS = [[5, 17, 42, 9], [7], [11, 12, 13, 14, 15, 16, 20], [30, 31]]
RESPONSES = [[100, 101], [60, 61, 62, 63, 64, 65], [70], [80, 81, 82]]
MODEL_KINDS = ["llama-untied", "llama-tied", "qwen2-untied", "qwen2-tied", "llama-lora"]


def build_model(kind: str, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(0)
    family, head = kind.split("-")
    config_class, model_class = (
        (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    model = model_class(config_class(**SHAPE, vocab_size=vocab, tie_word_embeddings=head == "tied", pad_token_id=0))
    if head != "lora":
        return model.eval()
    model = wrap_with_lora(model, LoraSettings(r=4, alpha=8)).eval()
    with torch.no_grad():  # LoRA B starts at 0; give the adapters an effect worth checking
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module", params=MODEL_KINDS)
def model(request):
    torch.set_num_threads(1)
    return build_model(request.param)


def batch(vocab: int = VOCAB, top_k: int = 5):
    input_ids, attention_mask, response_mask = build_teacher_forced_batch(PROMPTS, RESPONSES, 0, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    top_ids = torch.randint(0, vocab, (*response_mask.shape, top_k), generator=generator)
    return input_ids, attention_mask, response_mask, top_ids


def full_reference(model, input_ids, attention_mask, top_ids, temperature):
    """The full path: log_softmax over every position's whole vocabulary, float32; (B, T-1) and (B, T-1, K)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)  # (B, T-1, V)
    chosen = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return chosen, entropy, log_probs.gather(-1, top_ids), log_probs


def chunked(model, input_ids, attention_mask, response_mask, top_ids, temperature, chunk):
    hidden = decoder_hidden(model, input_ids, attention_mask)
    head = model.get_output_embeddings()
    return response_token_stats(hidden, head, input_ids, response_mask, temperature, chunk, top_ids)


def assert_masked(values: torch.Tensor, full: torch.Tensor, response_mask: torch.Tensor) -> None:
    """Equal to the full path at response positions, exactly 0 elsewhere."""
    keep = response_mask.bool()
    assert torch.allclose(values[keep], full[keep], atol=1e-5, rtol=1e-5), (values[keep] - full[keep]).abs().max()
    assert (values[~keep] == 0).all()


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_chunked_values_equal_the_full_log_softmax(model, chunk, temperature):
    input_ids, attention_mask, response_mask, top_ids = batch()
    with torch.no_grad():
        chosen, entropy, top, _ = full_reference(model, input_ids, attention_mask, top_ids, temperature)
        stats = chunked(model, input_ids, attention_mask, response_mask, top_ids, temperature, chunk)
    assert stats.logprobs.shape == stats.entropy.shape == response_mask.shape
    assert stats.top_logprobs.shape == top_ids.shape
    assert_masked(stats.logprobs, chosen, response_mask)
    assert_masked(stats.entropy, entropy, response_mask)
    assert_masked(stats.top_logprobs, top, response_mask[..., None].expand_as(top))


def test_without_entropy_or_top_ids_only_the_chosen_log_probs_come_back(model):
    input_ids, attention_mask, response_mask, top_ids = batch()
    with torch.no_grad():
        chosen, *_ = full_reference(model, input_ids, attention_mask, top_ids, 1.0)
        hidden = decoder_hidden(model, input_ids, attention_mask)
        head = model.get_output_embeddings()
        stats = response_token_stats(hidden, head, input_ids, response_mask, 1.0, 3, want_entropy=False)
    assert stats.entropy is None and stats.top_logprobs is None
    assert_masked(stats.logprobs, chosen, response_mask)


def test_decoder_hidden_is_the_models_last_hidden_state_and_the_head_gives_its_logits(model):
    input_ids, attention_mask, _, _ = batch()
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = decoder_hidden(model, input_ids, attention_mask)
    assert torch.allclose(hidden, output.hidden_states[-1], atol=1e-6)
    assert torch.allclose(model.get_output_embeddings()(hidden), output.logits, atol=1e-5)


def test_lora_adapters_apply_in_the_decoder_without_the_head():
    model = build_model("llama-lora")
    input_ids, attention_mask, _, _ = batch()
    with torch.no_grad():
        with_adapters = decoder_hidden(model, input_ids, attention_mask)
        with model.disable_adapter():
            without = decoder_hidden(model, input_ids, attention_mask)
            base_output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert (with_adapters - without).abs().max() > 1e-3
    assert torch.allclose(without, base_output.hidden_states[-1], atol=1e-6)


def loss_of(logprobs, entropy, top_logprobs, weights):
    """A loss touching every output, with per-position weights so no gradient cancels by symmetry."""
    return (logprobs * weights[0]).sum() - 0.1 * (entropy * weights[1]).sum() + (top_logprobs * weights[2]).sum()


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_gradients_equal_the_full_paths(model, chunk):
    input_ids, attention_mask, response_mask, top_ids = batch()
    generator = torch.Generator().manual_seed(2)
    weights = [torch.rand(response_mask.shape, generator=generator) * response_mask for _ in range(2)]
    weights.append(torch.rand(top_ids.shape, generator=generator) * response_mask[..., None])
    parameters = [p for p in model.parameters() if p.requires_grad]
    chosen, entropy, top, _ = full_reference(model, input_ids, attention_mask, top_ids, 0.8)
    full_grads = torch.autograd.grad(loss_of(chosen, entropy, top, weights), parameters)
    stats = chunked(model, input_ids, attention_mask, response_mask, top_ids, 0.8, chunk)
    chunked_grads = torch.autograd.grad(loss_of(*stats, weights), parameters)
    assert any(g.abs().max() > 0 for g in full_grads)
    for parameter, full, mine in zip(parameters, full_grads, chunked_grads):
        assert torch.allclose(mine, full, atol=1e-5, rtol=1e-4), (parameter.shape, (mine - full).abs().max())


def test_the_head_never_sees_more_rows_than_a_chunk_in_forward_or_backward():
    model = build_model("llama-untied", vocab=4096)
    input_ids, attention_mask, response_mask, top_ids = batch(vocab=4096)
    positions, chunk = int(response_mask.sum()), 4
    rows_seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].shape[0]))
    try:
        stats = chunked(model, input_ids, attention_mask, response_mask, top_ids, 1.0, chunk)
        forward_calls = len(rows_seen)
        loss_of(*stats, [response_mask, response_mask, response_mask[..., None]]).backward()
    finally:
        hook.remove()
    chunks = -(-positions // chunk)
    assert forward_calls == chunks and sum(rows_seen[:forward_calls]) == positions
    assert len(rows_seen) == 2 * chunks, "backward recomputes each chunk's logits once (checkpointed)"
    assert max(rows_seen) <= chunk


def test_backward_keeps_no_logits_only_the_chunks_hidden_states():
    """Everything autograd saves for backward, counted in elements: without the checkpoint every chunk
    would keep its (chunk, V) logits and softmax (several N x V in all); with it, about N x H."""
    vocab, hidden_size = 4096, SHAPE["hidden_size"]
    model = build_model("llama-untied", vocab=vocab)
    input_ids, attention_mask, response_mask, top_ids = batch(vocab=vocab)
    positions = int(response_mask.sum())
    with torch.no_grad():
        hidden = decoder_hidden(model, input_ids, attention_mask)
    hidden.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        stats = response_token_stats(hidden, model.get_output_embeddings(), input_ids, response_mask, 1.0, 4, top_ids)
    assert max(saved) < 4 * vocab, "no tensor of a chunk's logits is kept"
    assert sum(saved) < 4 * positions * hidden_size + 1000
    loss_of(*stats, [response_mask, response_mask, response_mask[..., None]]).backward()
    assert hidden.grad is not None and hidden.grad.abs().max() > 0


def test_extreme_logits_stay_finite_and_masked_positions_exactly_zero():
    model = build_model("qwen2-untied")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e4)  # logits in the tens of thousands
    input_ids, attention_mask, response_mask, top_ids = batch()
    stats = chunked(model, input_ids, attention_mask, response_mask, top_ids, 0.05, 7)
    keep = response_mask.bool()
    for values in stats:
        assert torch.isfinite(values).all()
    assert (stats.logprobs[~keep] == 0).all() and (stats.entropy[~keep] == 0).all()
    assert (stats.top_logprobs[~keep] == 0).all()
    assert (stats.logprobs[keep] <= 0).all() and (stats.entropy[keep] >= 0).all()
    loss_of(*stats, [response_mask, response_mask, response_mask[..., None]]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_batch_without_response_positions_gives_zeros():
    model = build_model("llama-untied")
    input_ids, attention_mask, response_mask, top_ids = batch()
    none = torch.zeros_like(response_mask)
    stats = chunked(model, input_ids, attention_mask, none, top_ids, 1.0, 7)
    assert all((values == 0).all() for values in stats)
    top = response_top_k(decoder_hidden(model, input_ids, attention_mask), model.lm_head, input_ids, none, 1.0, 7, 3)
    assert top.top_ids.shape == (*none.shape, 3) and (top.top_ids == 0).all()


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_top_k_equals_the_full_distributions_top_k(model, chunk):
    input_ids, attention_mask, response_mask, top_ids = batch()
    with torch.no_grad():
        chosen, _, _, log_probs = full_reference(model, input_ids, attention_mask, top_ids, 0.9)
    full = log_probs.topk(6, dim=-1)
    top = model_response_top_k(model, input_ids, attention_mask, response_mask, 0.9, chunk, 6)
    keep = response_mask.bool()
    assert_masked(top.logprobs, chosen, response_mask)
    assert torch.equal(top.top_ids[keep], full.indices[keep]) and (top.top_ids[~keep] == 0).all()
    assert torch.allclose(top.top_logprobs[keep], full.values[keep], atol=1e-5)
    all_of_it = model_response_top_k(model, input_ids, attention_mask, response_mask, 0.9, chunk, VOCAB + 10)
    assert all_of_it.top_ids.shape[-1] == VOCAB  # K = min(top_k, V)


def test_model_response_stats_returns_the_value_heads_hidden_states(model):
    input_ids, attention_mask, response_mask, top_ids = batch()
    with torch.no_grad():
        stats, hidden = model_response_stats(model, input_ids, attention_mask, response_mask, 1.0, 7, top_ids)
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        chosen, entropy, top, _ = full_reference(model, input_ids, attention_mask, top_ids, 1.0)
    assert torch.allclose(hidden, output.hidden_states[-1], atol=1e-6)
    assert_masked(stats.logprobs, chosen, response_mask)
    assert_masked(stats.entropy, entropy, response_mask)


def test_a_softcapped_head_is_refused_and_the_model_level_path_falls_back_to_its_logits():
    torch.manual_seed(0)
    config = Gemma2Config(**SHAPE, head_dim=8, vocab_size=VOCAB, final_logit_softcapping=5.0, pad_token_id=0)
    model = Gemma2ForCausalLM(config).eval()
    assert "final_logit_softcapping" in chunked_head_refusal(model)
    input_ids, attention_mask, response_mask, top_ids = batch()
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        decoder_hidden(model, input_ids, attention_mask)
    with torch.no_grad():
        chosen, entropy, top, _ = full_reference(model, input_ids, attention_mask, top_ids, 1.0)
        stats, _ = model_response_stats(model, input_ids, attention_mask, response_mask, 1.0, 7, top_ids)
    assert_masked(stats.logprobs, chosen, response_mask)
    assert_masked(stats.entropy, entropy, response_mask)
    assert_masked(stats.top_logprobs, top, response_mask[..., None].expand_as(top))


def test_plain_heads_are_accepted():
    for kind in MODEL_KINDS:
        assert chunked_head_refusal(build_model(kind)) is None, kind


def test_misshapen_inputs_are_refused():
    model = build_model("llama-untied")
    input_ids, attention_mask, response_mask, _ = batch()
    hidden = decoder_hidden(model, input_ids, attention_mask)
    with pytest.raises(ValueError, match="response_mask"):
        response_token_stats(hidden, model.lm_head, input_ids, response_mask[:, :-1], 1.0, 4)
    with pytest.raises(ValueError, match="chunk_positions"):
        response_token_stats(hidden, model.lm_head, input_ids, response_mask, 1.0, 0)


def test_under_bfloat16_autocast_values_and_gradients_follow_the_full_path():
    """The trainer runs its forward under autocast; the checkpointed chunks recompute under it too."""
    model = build_model("llama-untied")
    input_ids, attention_mask, response_mask, top_ids = batch()
    weights = [response_mask, response_mask, response_mask[..., None] * torch.ones(top_ids.shape)]
    parameters = list(model.parameters())
    with torch.autocast("cpu", torch.bfloat16):
        chosen, entropy, top, _ = full_reference(model, input_ids, attention_mask, top_ids, 1.0)
        full_grads = torch.autograd.grad(loss_of(chosen, entropy, top, weights), parameters)
        stats = chunked(model, input_ids, attention_mask, response_mask, top_ids, 1.0, 7)
        chunked_grads = torch.autograd.grad(loss_of(*stats, weights), parameters)
    assert stats.logprobs.dtype == torch.float32
    keep = response_mask.bool()
    assert torch.allclose(stats.logprobs[keep], chosen[keep], atol=2e-2)
    assert torch.allclose(stats.entropy[keep], entropy[keep], atol=2e-2)
    for full, mine in zip(full_grads, chunked_grads):
        assert torch.allclose(mine, full, atol=2e-2, rtol=5e-2), (mine - full).abs().max()


def test_with_the_models_gradient_checkpointing_gradients_equal_the_full_paths():
    model = build_model("qwen2-tied").train()  # no dropout in these configs: train mode changes nothing else
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids, attention_mask, response_mask, top_ids = batch()
    weights = [response_mask, response_mask, response_mask[..., None] * torch.ones(top_ids.shape)]
    parameters = list(model.parameters())
    chosen, entropy, top, _ = full_reference(model, input_ids, attention_mask, top_ids, 1.0)
    full_grads = torch.autograd.grad(loss_of(chosen, entropy, top, weights), parameters)
    stats = chunked(model, input_ids, attention_mask, response_mask, top_ids, 1.0, 7)
    chunked_grads = torch.autograd.grad(loss_of(*stats, weights), parameters)
    for full, mine in zip(full_grads, chunked_grads):
        assert torch.allclose(mine, full, atol=1e-5, rtol=1e-4), (mine - full).abs().max()
