"""Loading causal LMs from local directories, and the one teacher-forced log-prob computation
that the policy, the reference and the trainer all share (so their numbers agree)."""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config_section import resolve_attention
from .token_logprobs import LOGPROB_CHUNK_POSITIONS, model_response_stats, model_response_top_k

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_model_dir(model_dir: str, what: str) -> pathlib.Path:
    """The directory, checked before any library reads it: a path that is not a model directory would
    otherwise reach transformers as a hub repo id and fail there ("Repo id must be in the form ...")."""
    path = pathlib.Path(model_dir).expanduser()
    if not model_dir or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {model_dir!r} is not a Hugging Face model directory (no config.json)")
    if not list(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{what}: {model_dir!r} holds no *.safetensors weights (pickles are never loaded)")
    return path


def load_tokenizer(model_dir: str, what: str = "model_dir") -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory; `what` names the setting in the error when it is not one."""
    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(model_dir, what), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A section's `dtype` setting: 'auto' is bfloat16 on CUDA (every card Belay targets computes in
    it at full rate, and it needs no loss scaling) and float32 on CPU (unchanged numerics there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(
    model_dir: str,
    device: torch.device,
    what: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """Weights in `dtype` from safetensors only; offline."""
    model = AutoModelForCausalLM.from_pretrained(
        check_model_dir(model_dir, what),
        local_files_only=True,
        use_safetensors=True,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    return model.to(device)


def load_section_model(section, what: str) -> PreTrainedModel:
    """A service's causal LM as its config section asks: device, dtype, attention kernel."""
    device = resolve_device(section.device)
    return load_causal_lm(
        section.model_dir,
        device,
        what,
        resolve_dtype(section.dtype, device),
        resolve_attention(section.attn_implementation, device),
    )


def own_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter its own (anonymous) memory. from_pretrained leaves CPU weights backed
    by the memory-mapped safetensors file, so the first write into them (a hot-swap's copy, an
    optimizer step) pays a copy-on-write page fault per page: about 0.3 s on SmolLM2-135M, 1.5 s
    under load. Weights that will be written are copied once, at load time, instead."""
    with torch.no_grad():
        for parameter in model.parameters():  # tied weights are one Parameter: copied once, still tied
            parameter.data = parameter.data.clone()
    return model


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """The reference: eval mode, no parameter ever takes a gradient."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the vocabulary (token -> id) and the special tokens; equal iff ids mean the same text."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer's name and bytes (changes iff a weight changes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_teacher_forced_batch(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response rows.

    Returns input_ids (B, T), attention_mask (B, T), response_mask (B, T-1) where
    response_mask[b, t] = 1 iff token t+1 of row b is a response token, i.e. the position whose
    logits predict a response token. Prompt and padding positions are 0.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width - 1), dtype=torch.float32)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = list(prompt) + list(response)
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
        response_mask[row, len(prompt) - 1 : len(sequence) - 1] = 1.0
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)


MIN_TEMPERATURE = 1e-6


def below_min_temperature(temperature: float) -> bool:
    """Whether a (positive) temperature is under MIN_TEMPERATURE: far below 1e-6, logits / temperature
    overflows float32 and every probability is NaN. 1e-6 as the float32 a request field holds is a
    hair under 1e-6: hence the tolerance."""
    return temperature < 0.9999e-6


def next_token_log_probs(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature) over the vocabulary at every position but the last.

    input_ids, attention_mask: (B, T) -> log_probs (B, T-1, V), float32. Differentiable.
    """
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    return torch.log_softmax(output.logits[:, :-1].float() / temperature, dim=-1)


def _chunks(prompts: list[list[int]], responses: list[list[int]], max_tokens: int):
    """(start, stop) row ranges whose padded size stays under max_tokens (at least one row each)."""
    start = 0
    while start < len(prompts):
        stop = start + 1
        longest = len(prompts[start]) + len(responses[start])
        while stop < len(prompts):
            longest_next = max(longest, len(prompts[stop]) + len(responses[stop]))
            if longest_next * (stop - start + 1) > max_tokens:
                break
            longest, stop = longest_next, stop + 1
        yield start, stop
        start = stop


@torch.no_grad()
def response_logprobs(
    model: PreTrainedModel,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    temperature: float = 1.0,
    max_tokens_per_forward: int = 16384,
) -> list[torch.Tensor]:
    """Teacher-forced log-probabilities of each response's tokens, one 1-D tensor (R,) per row, no grad.

    Rows are forwarded in chunks of at most max_tokens_per_forward padded tokens; the output head
    runs on response positions only, LOGPROB_CHUNK_POSITIONS at a time (token_logprobs.py).
    """
    rows: list[torch.Tensor] = []
    for input_ids, attention_mask, response_mask in _teacher_forced_chunks(
        model, prompts, responses, pad_id, max_tokens_per_forward
    ):
        stats, _ = model_response_stats(
            model, input_ids, attention_mask, response_mask, temperature, LOGPROB_CHUNK_POSITIONS, want_entropy=False
        )
        rows.extend(stats.logprobs[row][response_mask[row].bool()].cpu() for row in range(len(input_ids)))
    return rows


@torch.no_grad()
def response_logprobs_with_top_k(
    model: PreTrainedModel,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    top_k: int,
    temperature: float = 1.0,
    max_tokens_per_forward: int = 16384,
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """response_logprobs, and the K likeliest tokens at each response position: (rows, top_rows)
    where top_rows[i] = (ids (R, K) int, logprobs (R, K)), K = min(top_k, vocabulary). No grad."""
    rows: list[torch.Tensor] = []
    top_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    for input_ids, attention_mask, response_mask in _teacher_forced_chunks(
        model, prompts, responses, pad_id, max_tokens_per_forward
    ):
        top = model_response_top_k(
            model, input_ids, attention_mask, response_mask, temperature, LOGPROB_CHUNK_POSITIONS, top_k
        )
        for row in range(len(input_ids)):
            where = response_mask[row].bool()
            rows.append(top.logprobs[row][where].cpu())
            top_rows.append((top.top_ids[row][where].cpu(), top.top_logprobs[row][where].cpu()))
    return rows, top_rows


def _teacher_forced_chunks(
    model: PreTrainedModel,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    max_tokens_per_forward: int,
):
    """(input_ids, attention_mask, response_mask) per chunk of rows, on the model's device."""
    device = next(model.parameters()).device
    for start, stop in _chunks(prompts, responses, max_tokens_per_forward):
        yield build_teacher_forced_batch(prompts[start:stop], responses[start:stop], pad_id, device)
