"""The reward section of Belay's config (config.py): which scorer the reward service runs and its
settings, every field typed and described; a `combined` reward's components are RewardConfigs too."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .config_section import ModelRuntime


class RewardConfig(ModelRuntime):
    """The reward service's scorer; with backend 'combined', each of `components` is one of these
    (only the backend fields below, plus its `name` and `weight`)."""

    backend: Literal[
        "vader", "hf_classifier", "embedding_similarity", "python", "http", "math_answer", "format", "combined"
    ] = Field("vader", description="which scorer serves Score (services/reward/backends.py describes each)")
    model_dir: str = Field(
        "",
        description="hf_classifier: local sequence-classification model directory; "
        "embedding_similarity: a sentence-embedding model (empty: the packaged all-MiniLM-L6-v2)",
    )
    address: str = Field("127.0.0.1:50053", description="host:port this service listens on / is reached at")
    metrics_port: int = Field(9103, ge=0, le=65535, description="Prometheus /metrics port (0: none)")
    device: str = Field("auto", description="hf_classifier, embedding_similarity: 'auto', 'cpu' or 'cuda[:N]'")
    max_length: int = Field(
        1024,
        ge=8,
        description="hf_classifier, embedding_similarity: tokens kept per text "
        "(the embedding model's own limit applies too)",
    )
    batch_size: int = Field(32, ge=1, description="hf_classifier, embedding_similarity: texts per forward pass")
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of the reward service (0: torch's "
        "default); it runs beside the reference, so on few cores give each half",
    )
    targets: list[str] = Field(
        [], description="embedding_similarity: target texts; a response scores its cosine similarity to the closest one"
    )
    function: str = Field(
        "", description="python: 'module:function' called with (prompts, responses), returning one float per pair"
    )
    url: str = Field("", description="http: reward endpoint; POST {prompts, responses} answers {scores}")
    timeout_seconds: float = Field(30.0, gt=0, description="http: deadline of one request (timeouts are not retried)")
    retries: int = Field(2, ge=0, description="http: further attempts after a connection error or a 5xx reply")
    retry_backoff_seconds: float = Field(0.5, ge=0, description="http: wait before the first retry, doubled each time")
    answer_key: str = Field("answer", description="math_answer: the metadata field holding each prompt's answer")
    check_timeout_seconds: float = Field(
        5.0, gt=0, description="math_answer, format: time one response's check may take; past it, it scores 0"
    )
    check_workers: int = Field(2, ge=1, description="math_answer: worker processes checking answers in parallel")
    pattern: str = Field(
        "", description="format: regular expression (the `regex` package) searched for in the response: 1 if found"
    )
    components: list[RewardConfig] = Field(
        [],
        description="combined: the scorers, each {name, weight, backend, "
        "...its fields}; score = sum of weight * component score",
    )
    name: str = Field("", description="a combined component's label in model_id and metrics")
    weight: float = Field(1.0, description="a combined component's multiplier")

    @model_validator(mode="after")
    def _backend_needs_model(self) -> RewardConfig:
        import math

        if self.backend == "hf_classifier" and not self.model_dir:
            raise ValueError("model_dir is required when backend is 'hf_classifier'")
        if self.backend == "embedding_similarity":
            if not self.targets or not all(target.strip() for target in self.targets):
                raise ValueError(
                    "targets is required when backend is 'embedding_similarity' "
                    "(a list of non-empty texts to compare responses with)"
                )
        if self.backend == "python":
            module, _, function = self.function.partition(":")
            if not self.function:
                raise ValueError("function is required when backend is 'python' (as 'module:function')")
            if not module.strip() or not function.strip():
                raise ValueError(f"function must read 'module:function' (got {self.function!r})")
        if self.backend == "http":
            if not self.url:
                raise ValueError("url is required when backend is 'http' (e.g. http://127.0.0.1:8000/score)")
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"url must start with http:// or https:// (got {self.url!r})")
        if self.backend == "format":
            import regex

            if not self.pattern:
                raise ValueError("pattern is required when backend is 'format' (a regular expression)")
            try:
                regex.compile(self.pattern)
            except regex.error as error:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {error}") from None
        if self.backend == "combined":
            if not self.components:
                raise ValueError(
                    "components is required when backend is 'combined' (a list of {name, weight, backend, ...})"
                )
            names = [component.name for component in self.components]
            for index, component in enumerate(self.components):
                if not component.name:
                    raise ValueError(f"components[{index}].name is required (it labels the component's metrics)")
                if component.backend == "combined":
                    raise ValueError(f"components[{index}] ({component.name}): a component cannot be 'combined'")
                if not math.isfinite(component.weight):
                    raise ValueError(f"components[{index}].weight must be finite (got {component.weight})")
                service_fields = component.model_fields_set & {"address", "metrics_port", "torch_threads"}
                if service_fields:
                    raise ValueError(
                        f"components[{index}] ({component.name}): {sorted(service_fields)} belong to "
                        "the reward section, not to a component"
                    )
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"components: names must be unique (repeated: {duplicates})")
        elif self.components:
            raise ValueError(f"components is only used when backend is 'combined' (backend is {self.backend!r})")
        return self
