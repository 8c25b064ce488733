"""Belay's one config schema: a YAML file with a section per service, every field overridable
from the environment, validated at start-up with errors that name the field.

Environment overrides: BELAY_<SECTION>__<FIELD>=value, e.g. BELAY_TRAINER__LR=1e-5.
Values are parsed as YAML scalars, so numbers, booleans and lists work.
"""
from __future__ import annotations

import os
import pathlib
from typing import Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "BELAY_"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("belay", description="run name: prefixes every Redis key, labels metrics")
    checkpoint_dir: str = Field("runs/belay/checkpoints", description="where the trainer writes policy versions")
    log_level: str = Field("INFO", description="Python logging level of every service")


class RedisConfig(Section):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the rollout stream and version key")
    max_queue_lag: int = Field(32, ge=1, description="policy pauses while this many rollouts wait unread (back-pressure)")
    block_ms: int = Field(1000, ge=1, description="how long a trainer read blocks waiting for rollouts")


class GrpcConfig(Section):
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="send and receive limit on servers and clients")
    max_batch_size: int = Field(256, ge=1, description="most rows one request may carry")
    max_sequence_length: int = Field(4096, ge=2, description="most tokens one prompt+response row may carry")
    workers: int = Field(4, ge=1, description="server thread pool size")
    reflection: bool = Field(True, description="serve gRPC server reflection")
    shutdown_grace_seconds: float = Field(5.0, ge=0, description="grace for in-flight calls on SIGTERM (below compose's 10 s)")


class ModelServiceConfig(Section):
    model_dir: str = Field("", description="local Hugging Face model directory (safetensors)")
    address: str = Field("127.0.0.1:50051", description="host:port this service listens on / is reached at")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Prometheus /metrics port (0: none)")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu' or 'cuda[:N]'")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0: torch's default)")
    max_tokens_per_forward: int = Field(16384, ge=16, description="rows per forward pass are chunked to stay under this many tokens")


class ReferenceConfig(ModelServiceConfig):
    address: str = "127.0.0.1:50052"
    metrics_port: int = 9102


class RewardConfig(Section):
    backend: Literal["vader", "hf_classifier"] = Field("vader", description="which scorer serves Score")
    model_dir: str = Field("", description="hf_classifier: local sequence-classification model directory")
    address: str = Field("127.0.0.1:50053", description="host:port this service listens on / is reached at")
    metrics_port: int = Field(9103, ge=0, le=65535, description="Prometheus /metrics port (0: none)")
    device: str = Field("auto", description="hf_classifier: 'auto', 'cpu' or 'cuda[:N]'")
    max_length: int = Field(1024, ge=8, description="hf_classifier: tokens kept per (prompt, response) text")

    @model_validator(mode="after")
    def _backend_needs_model(self) -> "RewardConfig":
        if self.backend == "hf_classifier" and not self.model_dir:
            raise ValueError("model_dir is required when backend is 'hf_classifier'")
        return self


class PolicyConfig(ModelServiceConfig):
    address: str = "127.0.0.1:50051"
    metrics_port: int = 9101
    prompts_file: str = Field("prompts/default.txt", description="one prompt per line; the actor cycles through them")
    prompts_per_batch: int = Field(4, ge=1, description="prompts sampled per generation batch")
    samples_per_prompt: int = Field(2, ge=1, description="responses per prompt (they share a group id)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (seed: 1.0; too cold learns nothing)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass (seed: 0.9)")
    max_new_tokens: int = Field(128, ge=1, description="response length cap")
    seed: int = Field(0, description="sampler seed; batch k uses seed + k")
    reference_timeout_seconds: float = Field(120.0, gt=0, description="deadline of a reference LogProbs call")
    reward_timeout_seconds: float = Field(60.0, gt=0, description="deadline of a reward Score call")
    startup_timeout_seconds: float = Field(600.0, gt=0, description="how long to wait for reference and reward at start")
    run_actor: bool = Field(True, description="run the rollout loop (False: serve gRPC only)")
    version_poll_seconds: float = Field(0.5, gt=0, description="how often a paused actor looks for a new version")


class TrainerConfig(Section):
    model_dir: str = Field("", description="initial policy weights (the SFT model), used when no checkpoint exists")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0: torch's default)")
    metrics_port: int = Field(9104, ge=0, le=65535, description="Prometheus /metrics port (0: none)")
    policy_address: str = Field("127.0.0.1:50051", description="policy service, told of each new version")
    batch_size: int = Field(8, ge=2, description="rollouts per PPO update (the advantage baseline is their mean)")
    minibatch_size: int = Field(8, ge=1, description="rollouts per optimizer step")
    ppo_epochs: int = Field(1, ge=1, description="passes over each batch; the seed: 4 is already aggressive")
    force_ppo_epochs: bool = Field(False, description="allow ppo_epochs above 4")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip ε")
    kl_coef: float = Field(0.05, ge=0, description="β in total reward = reward − β·KL")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping norm; clipping is always on")
    max_staleness: int = Field(1, ge=0, description="drop rollouts more than this many versions behind")
    temperature: float = Field(1.0, gt=0, description="must equal the policy's sampling temperature")
    max_steps: int = Field(0, ge=0, description="stop after this many updates (0: run until stopped)")
    keep_checkpoints: int = Field(3, ge=2, description="newest checkpoints kept on disk (older ones are deleted)")
    seed: int = Field(0, description="torch seed of the trainer")

    @field_validator("max_grad_norm")
    @classmethod
    def _clipping_always_on(cls, value: float | None) -> float:
        if value is None or not value > 0:
            raise ValueError("gradient clipping is always on: set a positive max_grad_norm (the seed's rule)")
        return value

    @model_validator(mode="after")
    def _epochs_and_minibatches(self) -> "TrainerConfig":
        if self.ppo_epochs > 4 and not self.force_ppo_epochs:
            raise ValueError(f"ppo_epochs={self.ppo_epochs} is above 4, which the seed calls aggressive; "
                             "set force_ppo_epochs: true to insist")
        if self.minibatch_size > self.batch_size:
            raise ValueError(f"minibatch_size={self.minibatch_size} exceeds batch_size={self.batch_size}")
        return self


class BelayConfig(Section):
    run: RunConfig = RunConfig()
    redis: RedisConfig = RedisConfig()
    grpc: GrpcConfig = GrpcConfig()
    policy: PolicyConfig = PolicyConfig()
    reference: ReferenceConfig = ReferenceConfig()
    reward: RewardConfig = RewardConfig()
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _policy_and_trainer_agree(self) -> "BelayConfig":
        if abs(self.policy.temperature - self.trainer.temperature) > 1e-9:
            raise ValueError(f"trainer.temperature={self.trainer.temperature} differs from policy.temperature="
                             f"{self.policy.temperature}: PPO's ratio needs both log-probabilities at one temperature")
        return self


class ConfigError(ValueError):
    """A config file or override that cannot run; the message names each bad field."""


def _apply_env(data: dict, environ: Mapping[str, str]) -> dict:
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, field = key[len(ENV_PREFIX):].lower().partition("__")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{key}: section '{section}' is not a mapping in the config file")
        data[section][field] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> BelayConfig:
    """Read YAML (optional), apply BELAY_SECTION__FIELD overrides, validate; ConfigError names bad fields."""
    data: dict = {}
    if path is not None:
        file = pathlib.Path(path)
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
