"""Log-probs, entropy and top-k at response positions only, the output head applied a chunk at a time.

The plain path (models.next_token_log_probs) asks the model for logits at every position and takes a
float32 log_softmax over them: (B, T-1, V) floats, plus their exp for the entropy, prompt and padding
positions included. At Qwen's V = 151,936 that, not the weights, is most of the activation memory. Here
the model's decoder stops before the head (decoder_hidden -> (B, T, H)); only the N positions where the
response mask is 1 are kept ((N, H)); and the head maps chunk_positions rows at a time to (chunk, V)
logits, reduced at once to a few numbers per row. Under grad each chunk runs inside
torch.utils.checkpoint, so backward keeps only its (chunk, H) input and recomputes its logits: the
extra peak memory is one chunk's, about 4 float32 (chunk, V) tensors, never N x V.

The values are the plain path's, to float tolerance: the same float32 upcast, the same division by the
temperature, log p = logit - logsumexp(logits). Positions outside the response are exactly 0.

Where the head is not a plain linear map of the last hidden state (Gemma-2's final_logit_softcapping,
Cohere's logit_scale, Granite's logits_scaling, ...), chunked_head_refusal says why, and
model_response_stats takes the model's own logits instead (the reductions still run in chunks, but the
model's (B, T, V) logits exist).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

# Config fields that put something between the last hidden state and the logits besides the head's
# matmul; a model with any of them set (and not the neutral value) gets the model's own logits instead.
# A deny-list: a model that transforms its logits in code without a config field goes unnoticed here;
# the tests check Llama, Qwen2 (accepted) and Gemma-2 (refused).
# Response positions the head runs on at a time in the no-grad teacher-forced passes (reference,
# policy LogProbs): 512 x 151,936 x 4 bytes = 0.3 GB of float32 logits at Qwen's vocabulary.
LOGPROB_CHUNK_POSITIONS = 512
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma-2, Gemma-3: logits = cap * tanh(logits / cap)
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
    "lm_head_multiplier": 1.0,  # Falcon-H1: logits * lm_head_multiplier
}


class TokenStats(NamedTuple):
    """Per-position statistics of the next token; every tensor is 0 outside the response.

    logprobs (B, T-1) float32: log p(input_ids[b, t+1] | input_ids[b, :t+1]);
    entropy (B, T-1) float32 or None: H[p(. | input_ids[b, :t+1])];
    top_logprobs (B, T-1, K) float32 or None: log p at the given top_ids.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    top_logprobs: torch.Tensor | None


class TopK(NamedTuple):
    """The K likeliest next tokens at each response position; 0 (ids and log-probs) outside it.

    logprobs (B, T-1) float32 of the chosen tokens; top_ids (B, T-1, K) long; top_logprobs (B, T-1, K)
    float32, in descending order of probability.
    """

    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself). peft injects its LoRA layers
    into that model's modules in place, so its decoder still applies the adapters."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def chunked_head_refusal(model: torch.nn.Module) -> str | None:
    """Why logits are not output_head(last hidden state) for this model, or None when they are."""
    base = unwrapped(model)
    configs = [base.config]
    if hasattr(base.config, "get_text_config"):
        configs.append(base.config.get_text_config())
    for config in configs:
        for field, neutral in LOGIT_TRANSFORMS.items():
            value = getattr(config, field, neutral)
            if value is not None and value != neutral:
                return f"config.{field} = {value!r} transforms the logits after the output head"
    head = base.get_output_embeddings()
    linear = getattr(head, "base_layer", head)  # a LoRA-wrapped head is still linear
    if not isinstance(linear, torch.nn.Linear):
        return f"the output head is {type(head).__name__}, not a linear map"
    try:
        base.get_decoder()
    except (AttributeError, ValueError) as error:
        return f"no decoder to run without the head: {error}"
    return None


def decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last hidden state after the final norm, without the output head (no logits are made).

    input_ids, attention_mask: (B, T) -> (B, T, H) in the model's dtype; hidden[b, t] predicts token
    t+1, and output_head(hidden) equals the model's logits. Differentiable (LoRA adapters included).
    Raises ValueError where chunked_head_refusal objects: use model_response_stats, which falls back.
    """
    refusal = chunked_head_refusal(model)
    if refusal is not None:
        raise ValueError(f"cannot split the output head off {type(unwrapped(model)).__name__}: {refusal}")
    decoder = unwrapped(model).get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _selected(response_mask: torch.Tensor, hidden: torch.Tensor, input_ids: torch.Tensor):
    """Response positions (rows, columns) (N,), their hidden states (N, H) and next tokens (N,)."""
    if response_mask.dim() != 2 or input_ids.shape != (response_mask.shape[0], response_mask.shape[1] + 1):
        raise ValueError(
            f"response_mask {tuple(response_mask.shape)} must be (B, T-1) for input_ids {tuple(input_ids.shape)} (B, T)"
        )
    if hidden.shape[:2] not in (input_ids.shape, response_mask.shape):
        raise ValueError(f"hidden {tuple(hidden.shape)} must be (B, T, H) or (B, T-1, H) for input_ids (B, T)")
    rows, columns = (response_mask != 0).nonzero(as_tuple=True)
    return rows, columns, hidden[rows, columns], input_ids[rows, columns + 1]


def _scattered(values: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(N, ...) values at (rows, columns) of a zero (B, T-1, ...) tensor. Differentiable."""
    out = values.new_zeros((*shape, *values.shape[1:]))
    return out.index_put((rows, columns), values)


def _chunk_stats(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    top_ids: torch.Tensor | None,
    temperature: float,
    want_entropy: bool,
) -> tuple[torch.Tensor, ...]:
    """One chunk: hidden (C, H), targets (C,), top_ids (C, K) or None ->
    (logprobs (C,), [entropy (C,)], [top_logprobs (C, K)]), with z = head(hidden) / temperature in float32:

        log p(target) = z[target] - logsumexp(z),   entropy = logsumexp(z) - sum_v softmax(z)_v z_v.
    """
    logits = head(hidden).float() / temperature  # (C, V)
    log_z = torch.logsumexp(logits, dim=-1)  # (C,)
    out = [logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z]
    if want_entropy:
        out.append(log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1))
    if top_ids is not None:
        out.append(logits.gather(-1, top_ids) - log_z.unsqueeze(-1))
    return tuple(out)


def response_token_stats(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    chunk_positions: int,
    top_ids: torch.Tensor | None = None,
    want_entropy: bool = True,
) -> TokenStats:
    """Chosen log-probs, entropy and log-probs at top_ids, at response positions, chunk by chunk.

    hidden (B, T, H) or (B, T-1, H): hidden[b, t] predicts input_ids[b, t+1]; head: (C, H) -> (C, V)
    (model.get_output_embeddings()); input_ids (B, T); response_mask (B, T-1), 1 at the positions kept;
    top_ids (B, T-1, K) long or None. With z = head(hidden[b, t]) / temperature in float32:

        logprobs[b, t]        = z[input_ids[b, t+1]] - logsumexp(z)
        entropy[b, t]         = logsumexp(z) - sum_v softmax(z)_v z_v       (= -sum_v p_v log p_v)
        top_logprobs[b, t, k] = z[top_ids[b, t, k]] - logsumexp(z)

    where response_mask[b, t] != 0, and exactly 0 elsewhere (those positions are never computed).
    The head sees at most chunk_positions rows at once. Under grad each chunk is checkpointed: backward
    keeps its (chunk, H) input and recomputes the (chunk, V) logits, so the extra peak memory is about
    4 * chunk_positions * V * 4 bytes whatever the batch.
    """
    if chunk_positions < 1:
        raise ValueError(f"chunk_positions must be a positive number of rows, got {chunk_positions}")
    rows, columns, selected, targets = _selected(response_mask, hidden, input_ids)  # (N,), (N,), (N, H), (N,)
    selected_top = None if top_ids is None else top_ids[rows, columns]  # (N, K)
    grad = torch.is_grad_enabled() and (selected.requires_grad or any(p.requires_grad for p in head.parameters()))
    pieces = []
    for start in range(0, max(selected.shape[0], 1), chunk_positions):  # one (0, H) chunk when N = 0
        stop = start + chunk_positions
        args = (head, selected[start:stop], targets[start:stop])
        args += (None if selected_top is None else selected_top[start:stop], temperature, want_entropy)
        pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False) if grad else _chunk_stats(*args))
    stacked = list(map(torch.cat, zip(*pieces)))  # [(N,), (N,), (N, K)] as asked for
    shape = response_mask.shape
    logprobs = _scattered(stacked.pop(0), rows, columns, shape)
    entropy = _scattered(stacked.pop(0), rows, columns, shape) if want_entropy else None
    top_logprobs = _scattered(stacked.pop(0), rows, columns, shape) if top_ids is not None else None
    return TokenStats(logprobs, entropy, top_logprobs)


def response_top_k(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    chunk_positions: int,
    top_k: int,
) -> TopK:
    """The chosen tokens' log-probs and the K = min(top_k, V) likeliest tokens at each response position,
    no grad, chunk by chunk (the teacher-forced path of response_logprobs with top_k > 0).

    hidden (B, T, H) or (B, T-1, H), head, input_ids (B, T), response_mask (B, T-1) as in
    response_token_stats. With log_p = z - logsumexp(z), z = head(hidden[b, t]) / temperature in float32:

        logprobs[b, t] = log_p[input_ids[b, t+1]],   (top_logprobs, top_ids)[b, t] = topk(log_p, K)

    at response positions, 0 elsewhere. The topk runs on log_p (as the plain path does), so ties break alike.
    """
    if chunk_positions < 1 or top_k < 1:
        raise ValueError(f"chunk_positions ({chunk_positions}) and top_k ({top_k}) must be positive")
    with torch.no_grad():
        rows, columns, selected, targets = _selected(response_mask, hidden, input_ids)
        chosen, ids, values = [], [], []
        for start in range(0, max(selected.shape[0], 1), chunk_positions):  # one (0, H) chunk when N = 0
            logits = head(selected[start : start + chunk_positions]).float() / temperature  # (C, V)
            log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # (C, V)
            chosen.append(log_p.gather(-1, targets[start : start + chunk_positions].unsqueeze(-1)).squeeze(-1))
            top = log_p.topk(min(top_k, log_p.shape[-1]), dim=-1)
            values.append(top.values)
            ids.append(top.indices)
        shape = response_mask.shape
        return TopK(
            _scattered(torch.cat(chosen), rows, columns, shape),
            _scattered(torch.cat(ids), rows, columns, shape),
            _scattered(torch.cat(values), rows, columns, shape),
        )


def hidden_and_head(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(head input (B, T, H or V), head, last hidden states (B, T, H)) for response_token_stats / _top_k.

    Normally the decoder's last hidden state (after the final norm), the model's output head, and the
    same hidden state again (what a value head reads: values = value_head(hidden[:, :-1])). Where
    chunked_head_refusal objects, the model's own logits (B, T, V) stand in for the head's input and an
    identity for the head: the values stay right, only the saving is lost.
    """
    if chunked_head_refusal(model) is None:
        hidden = decoder_hidden(model, input_ids, attention_mask)
        return hidden, unwrapped(model).get_output_embeddings(), hidden
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return output.logits, torch.nn.Identity(), output.hidden_states[-1]


def model_response_stats(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    chunk_positions: int,
    top_ids: torch.Tensor | None = None,
    want_entropy: bool = True,
) -> tuple[TokenStats, torch.Tensor]:
    """The model on a batch: (response_token_stats's TokenStats, last hidden states (B, T, H)).

    input_ids, attention_mask (B, T); response_mask (B, T-1); top_ids (B, T-1, K) or None. Differentiable.
    """
    head_input, head, hidden = hidden_and_head(model, input_ids, attention_mask)
    stats = response_token_stats(
        head_input, head, input_ids, response_mask, temperature, chunk_positions, top_ids, want_entropy
    )
    return stats, hidden


def model_response_top_k(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    chunk_positions: int,
    top_k: int,
) -> TopK:
    """The model on a batch, no grad: response_top_k's TopK.

    input_ids, attention_mask (B, T); response_mask (B, T-1). Where chunked_head_refusal objects, the
    model's own logits feed the chunks (see hidden_and_head).
    """
    with torch.no_grad():
        head_input, head, _ = hidden_and_head(model, input_ids, attention_mask)
        return response_top_k(head_input, head, input_ids, response_mask, temperature, chunk_positions, top_k)
