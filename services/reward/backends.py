"""Reward backends: anything that turns (prompt, response) texts into one raw float each.

Swap in another reward model by adding a backend here (or by running another service that
speaks belay.v1.Reward). The trainer normalises; backends return raw scores.
"""
from __future__ import annotations

import hashlib
import pathlib
from typing import Protocol

import torch


class RewardBackend(Protocol):
    model_id: str
    revision: str

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One raw score per (prompt, response) pair, in order."""


class VaderSentimentBackend:
    """VADER's compound sentiment of the response text, in [-1, 1]; runs offline from its lexicon."""

    def __init__(self):
        import vaderSentiment
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        lexicon = pathlib.Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
        self.model_id = "vader-sentiment"
        self.revision = hashlib.sha256(lexicon.read_bytes()).hexdigest()[:16]

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(self.analyzer.polarity_scores(response)["compound"]) for response in responses]


class HFClassifierBackend:
    """A Hugging Face sequence-classification reward model from a local directory: one logit per text.

    The text is the conversation through the tokenizer's chat template when it has one, else the
    (prompt, response) text pair; truncated to max_length tokens.
    """

    def __init__(self, model_dir: str, device: torch.device, max_length: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..common.models import check_model_dir, weights_fingerprint

        check_model_dir(model_dir, "reward.model_dir")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward.model_dir {model_dir}: a reward model has one output logit, "
                             f"this one has num_labels={self.model.config.num_labels}")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device
        self.max_length = max_length
        self.model_id = model_dir
        self.revision = weights_fingerprint(self.model)[:16]

    def _texts(self, prompts: list[str], responses: list[str]):
        if self.tokenizer.chat_template:
            conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                             for p, r in zip(prompts, responses)]
            texts = self.tokenizer.apply_chat_template(conversations, tokenize=False)
            return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt", add_special_tokens=False)
        return self.tokenizer(prompts, responses, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        batch = self._texts(prompts, responses).to(self.device)
        with torch.no_grad():
            logits = self.model(**batch).logits  # (B, 1)
        return logits[:, 0].float().cpu().tolist()


def build_backend(backend: str, model_dir: str, device: torch.device, max_length: int) -> RewardBackend:
    if backend == "vader":
        return VaderSentimentBackend()
    if backend == "hf_classifier":
        return HFClassifierBackend(model_dir, device, max_length)
    raise ValueError(f"reward.backend: unknown backend {backend!r} (known: vader, hf_classifier)")
