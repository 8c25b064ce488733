"""Loading causal LMs from local directories, and the one teacher-forced log-prob computation
that the policy, the reference and the trainer all share (so their numbers agree)."""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_model_dir(model_dir: str, what: str) -> pathlib.Path:
    path = pathlib.Path(model_dir)
    if not model_dir or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {model_dir!r} is not a Hugging Face model directory (no config.json)")
    if not list(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{what}: {model_dir!r} holds no *.safetensors weights (pickles are never loaded)")
    return path


def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_dir: str, device: torch.device, what: str) -> PreTrainedModel:
    """fp32 weights from safetensors only; offline."""
    check_model_dir(model_dir, what)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32)
    return model.to(device)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """The reference: eval mode, no parameter ever takes a gradient."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the vocabulary (token -> id) and the special tokens; equal iff ids mean the same text."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
               "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer's name and bytes (changes iff a weight changes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_teacher_forced_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        input_ids[row, :len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[row, :len(sequence)] = 1
        response_mask[row, len(prompt) - 1:len(sequence) - 1] = 1.0
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)


def token_logprobs(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token under softmax(logits / temperature).

    input_ids, attention_mask: (B, T). Returns (logprobs (B, T-1), entropy (B, T-1)), where
    logprobs[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1]). Differentiable.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
    logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = torch.gather(log_probs, -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, T-1)
    return chosen, entropy


def response_logprobs(model: PreTrainedModel, prompts: list[list[int]], responses: list[list[int]],
                      pad_id: int, temperature: float = 1.0, max_tokens_per_forward: int = 16384
                      ) -> list[torch.Tensor]:
    """Teacher-forced log-probabilities of each response's tokens, one 1-D tensor per row, no grad.

    Rows are forwarded in chunks of at most max_tokens_per_forward padded tokens.
    """
    device = next(model.parameters()).device
    results: list[torch.Tensor] = []
    start = 0
    with torch.no_grad():
        while start < len(prompts):
            stop = start + 1
            longest = len(prompts[start]) + len(responses[start])
            while stop < len(prompts):
                longest_next = max(longest, len(prompts[stop]) + len(responses[stop]))
                if longest_next * (stop - start + 1) > max_tokens_per_forward:
                    break
                longest, stop = longest_next, stop + 1
            input_ids, attention_mask, response_mask = build_teacher_forced_batch(
                prompts[start:stop], responses[start:stop], pad_id, device)
            logprobs, _ = token_logprobs(model, input_ids, attention_mask, temperature)
            for row in range(stop - start):
                results.append(logprobs[row][response_mask[row].bool()].cpu())
            start = stop
    return results
