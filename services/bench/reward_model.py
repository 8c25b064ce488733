"""The bench's reward model: a sequence classifier the size of the policy (SmolLM2-135M's trunk
with a seeded, randomly initialised one-output score head), so Belay and TRL's PPOTrainer pay for
the same reward forward pass. Built once from the causal LM's safetensors and cached."""

from __future__ import annotations

import pathlib

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..common.smollm2 import save_model_dir


def ensure_reward_model(base_dir: str | pathlib.Path, out_dir: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    """out_dir holds (after the first call builds it) base_dir's trunk with a 1-label score head."""
    base, out = pathlib.Path(base_dir).expanduser(), pathlib.Path(out_dir).expanduser()
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base} is not a Hugging Face model directory (no config.json)")
    torch.manual_seed(seed)  # the score head is the only random part
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=torch.float32, local_files_only=True, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return save_model_dir(model, tokenizer, out)
