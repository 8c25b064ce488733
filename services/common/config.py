"""Belay's one config schema: a YAML file with a section per service, every field overridable
from the environment, validated at start-up with errors that name the field.

Environment overrides: BELAY_<SECTION>__<FIELD>=value, e.g. BELAY_TRAINER__LR=1e-5.
Values are parsed as YAML scalars, so numbers, booleans and lists work.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "BELAY_"
log = logging.getLogger(__name__)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    metrics_address: str = Field(
        "127.0.0.1",
        description="address every /metrics server binds (0.0.0.0 inside "
        "a container network for Prometheus; loopback by default)",
    )


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


class ModelRuntime(Section):
    """How a section's model runs: the dtype of its weights and compute, and its attention kernel."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights and compute: 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16' or "
        "'float16'. The trainer keeps float32 master weights and AdamW state whatever this says and runs its "
        "forward passes under autocast in this dtype",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="'auto': flash_attention_2 on CUDA where the flash-attn package is installed, else sdpa"
    )


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


class RewardConfig(ModelRuntime):
    """The reward service's scorer; with backend 'combined', each of `components` is one of these
    (only the backend fields below, plus its `name` and `weight`)."""

    backend: Literal["vader", "hf_classifier", "embedding_similarity", "python", "http", "combined"] = Field(
        "vader", description="which scorer serves Score (services/reward/backends.py describes each)"
    )
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
    canary_max_new_tokens: int = Field(32, ge=1, description="response length cap of the canary answers")
    advertise_address: str = Field(
        "",
        description="host:port at which the trainer reaches THIS replica (the "
        "broadcast transport sends to each replica); empty: policy.address. Behind "
        "one Service name, set it per pod, e.g. to the pod IP",
    )


CLIPPING_ALWAYS_ON = "gradient clipping is always on: set a positive max_grad_norm (the seed's rule)"


class TrainerConfig(ModelRuntime):
    model_dir: str = Field("", description="initial policy weights (the SFT model), used when no checkpoint exists")
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in backward: activation memory / layers, ~+33% compute"
    )
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
    max_grad_norm: float = Field(1.0, description="gradient clipping norm; clipping is always on")
    max_staleness: int = Field(1, ge=0, description="drop rollouts more than this many versions behind")
    temperature: float = Field(1.0, gt=0, description="must equal the policy's sampling temperature")
    max_steps: int = Field(0, ge=0, description="stop after this many updates (0: run until stopped)")
    keep_checkpoints: int = Field(
        3,
        ge=2,
        description="newest persisted checkpoints kept on disk (older ones "
        "are deleted); published weights are pruned on their own",
    )
    checkpoint_every_steps: int = Field(
        10,
        ge=1,
        description="persist the full resumable checkpoint every this many updates (also at max_steps and on SIGTERM)",
    )
    checkpoint_every_seconds: float = Field(
        600.0,
        gt=0,
        description="... or once this many seconds have passed since the last persist, whichever comes first",
    )
    weight_transport: Literal["file", "broadcast", "cuda_ipc"] = Field(
        "file",
        description="how each update's weights reach the policy: 'file' (safetensors in run.publish_dir), "
        "'broadcast' (a torch.distributed group per replica: gloo on CPU, NCCL on GPU) or 'cuda_ipc' (same GPU)",
    )
    broadcast_address: str = Field(
        "127.0.0.1:29650",
        description="broadcast: host:port of the trainer's rendezvous "
        "store, as the policy replicas reach it (the trainer listens on its port)",
    )
    broadcast_bucket_mb: float = Field(
        256.0, gt=0, description="broadcast/cuda_ipc: tensors travel in buckets of about this many MiB"
    )
    broadcast_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="broadcast: a replica that has not joined or "
        "received within this is dropped from the publish (it catches up later)",
    )
    seed: int = Field(0, description="torch seed of the trainer")
    # --- the PPO toolbox (docs/algorithm.md gives every formula); defaults are the seed's recipe ---
    kl_estimator: Literal["k1", "k2", "k3", "full"] = Field(
        "k1",
        description="per-token KL: k1 log π − log π_ref (seed), k2 ½(log ratio)², k3 (r−1)−log r, full Σπ log π/π_ref",
    )
    kl_top_k: int = Field(0, ge=0, description="full KL: reference rows of its top-k tokens (0: the whole vocabulary)")
    kl_placement: Literal["reward", "loss"] = Field(
        "reward", description="KL paid in the reward (seed, InstructGPT) or added to the loss (GRPO)"
    )
    kl_controller: Literal["fixed", "adaptive"] = Field(
        "fixed", description="β fixed at kl_coef, or Ziegler et al.'s adaptive controller towards kl_target"
    )
    kl_target: float = Field(6.0, gt=0, description="adaptive β: target KL per sequence, nats")
    kl_horizon: int = Field(10000, ge=1, description="adaptive β: horizon in rollouts")
    reward_clip: float | None = Field(
        None, gt=0, description="clip raw rewards to [−reward_clip, reward_clip] (None: off)"
    )
    reward_normalize: bool = Field(False, description="normalise rewards by running mean/std kept across steps")
    length_normalize: bool = Field(False, description="divide each reward by its response length in tokens")
    truncation_penalty: float = Field(
        0.0, ge=0, description="subtracted from the reward of responses cut at max_new_tokens"
    )
    advantage: Literal["batch_mean", "group", "rloo", "gae"] = Field(
        "batch_mean",
        description="baseline: batch mean (seed), group mean (GRPO), leave-one-out (RLOO), or GAE with a critic",
    )
    group_scale_by_std: bool = Field(False, description="group advantage: divide by the group's std (GRPO)")
    whiten_advantages: bool = Field(False, description="whiten advantages over the batch's response tokens")
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount γ")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    value_coef: float = Field(0.1, ge=0, description="GAE: weight of the value loss")
    value_clip: float = Field(0.2, gt=0, description="GAE: value clipping range around the old values")
    early_stop_kl: float | None = Field(
        None, gt=0, description="stop an update's epochs once approx KL(old||new) passes this"
    )
    loss_aggregation: Literal["token_mean", "sequence_mean"] = Field(
        "token_mean", description="average the PPO loss over all response tokens, or per sequence then over sequences"
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate decay after warm-up"
    )
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear learning-rate warm-up")
    lr_decay_steps: int = Field(1000, ge=1, description="optimizer steps over which linear/cosine decay reaches 0")
    # --- rails ---
    kl_hard_limit: float | None = Field(
        None,
        gt=0,
        description="KL per response (nats) of a batch past which the "
        "policy that sampled it is rolled back to the last good version (None: off)",
    )
    kl_limit_action: Literal["raise_beta", "lower_lr"] = Field(
        "raise_beta", description="after a rollback: multiply β by kl_limit_factor, or divide the learning rate by it"
    )
    kl_limit_factor: float = Field(
        2.0, gt=1, description="how strongly a rollback raises β or lowers the learning rate"
    )
    # --- failure detectors (services/trainer/detectors.py) ---
    detector_window: int = Field(
        6,
        ge=2,
        description="updates per detector window; every detector reads NaN "
        "until the first window is full, whose mean response length is the baseline",
    )
    detector_kl_bound: float = Field(
        6.0,
        gt=0,
        description="reward hacking: KL per response (nats) past which a "
        "rising reward is suspect (Ziegler et al.'s target; scale it with max_new_tokens)",
    )
    detector_length_ratio: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="shorter responses: fires when the window's "
        "mean response length falls below this share of the first window's",
    )
    detector_similarity_bound: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="template collapse: fires when responses "
        "to different prompts pass this mean Jaccard similarity of word 1-2-grams",
    )
    detector_still_kl: float = Field(
        0.05,
        gt=0,
        description="not moving: fires when KL per response (nats) stays "
        "below this for a whole window and the reward is flat",
    )
    detector_flat_reward: float = Field(
        2.0,
        gt=0,
        description="not moving: the reward counts as flat when its "
        "fitted rise across the window is under this many batch standard deviations",
    )
    # --- the review page ---
    review_port: int = Field(
        8080,
        ge=0,
        le=65535,
        description="HTTP port of the review page (recent samples, "
        "canaries, ratings), bound on run.metrics_address; 0: off",
    )

    @field_validator("max_grad_norm", mode="before")
    @classmethod
    def _clipping_cannot_be_switched_off(cls, value):
        """null is refused before type checking, so it gets the rule's reason, not a type error."""
        if value is None:
            raise ValueError(CLIPPING_ALWAYS_ON)
        return value

    @field_validator("max_grad_norm")
    @classmethod
    def _clipping_always_on(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(CLIPPING_ALWAYS_ON)
        return value

    @model_validator(mode="after")
    def _epochs_and_minibatches(self) -> TrainerConfig:
        if self.ppo_epochs > 4 and not self.force_ppo_epochs:
            raise ValueError(
                f"ppo_epochs={self.ppo_epochs} is above 4, which the seed calls aggressive; "
                "set force_ppo_epochs: true to insist"
            )
        if self.ppo_epochs > 4:
            log.warning("ppo_epochs=%d is above 4 (forced): the seed calls 4 already aggressive", self.ppo_epochs)
        if self.minibatch_size > self.batch_size:
            raise ValueError(f"minibatch_size={self.minibatch_size} exceeds batch_size={self.batch_size}")
        return self


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
