"""The trainer's section of Belay's config (config.py): the PPO update, its rails and its cadences,
every field typed and described, with the seed's recipe as the defaults."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .config_section import ModelRuntime

log = logging.getLogger(__name__)

CLIPPING_ALWAYS_ON = "gradient clipping is always on: set a positive max_grad_norm (the seed's rule)"


class TrainerConfig(ModelRuntime):
    model_dir: str = Field("", description="initial policy weights (the SFT model), used when no checkpoint exists")
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in backward: activation memory / layers, ~+33% compute"
    )
    logprob_chunk_positions: int = Field(
        512,
        ge=1,
        description="response positions the output head runs on at a time when computing log-probs and entropy "
        "(its float32 logits: positions x vocabulary x 4 bytes, recomputed in backward); never (B, T, V) at once",
    )
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'")
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="data parallelism under torchrun, read only when WORLD_SIZE > 1: 'ddp' (DistributedDataParallel, "
        "a whole model and AdamW state per rank) or 'fsdp' (FSDP2 fully_shard per transformer block and the root: "
        "parameters, gradients and AdamW state sharded across ranks)",
    )
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
    eval_every: int = Field(
        0,
        ge=0,
        description="every this many versions (version 0 included) the policy answers the held-out rows "
        "(data.heldout_rows) and scores them: reward, accuracy where the reward is math_answer, KL, length "
        "(0: off)",
    )
    eval_max_rows: int = Field(64, ge=1, description="held-out rows answered per evaluation (the first ones)")
    eval_metric: Literal["reward_mean", "accuracy"] = Field(
        "reward_mean",
        description="the evaluation figure (higher is better) that marks the best persisted version "
        "(<checkpoint_dir>/best.json, never pruned)",
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
    overlong_penalty: float = Field(
        0.0,
        ge=0,
        description="DAPO's soft overlong punishment: up to this much subtracted, rising linearly across the "
        "last overlong_band_tokens before policy.max_new_tokens (0: off; docs/algorithm.md)",
    )
    overlong_band_tokens: int = Field(
        32, ge=1, description="overlong penalty: the band L_cache, in tokens, ending at policy.max_new_tokens"
    )
    advantage: Literal["batch_mean", "group", "rloo", "gae"] = Field(
        "batch_mean",
        description="baseline: batch mean (seed), group mean (GRPO), leave-one-out (RLOO), or GAE with a critic",
    )
    group_scale_by_std: bool = Field(False, description="group advantage: divide by the group's std (GRPO)")
    whiten_advantages: bool = Field(False, description="whiten advantages over the batch's response tokens")
    entropy_coef: float = Field(
        0.0,
        ge=0,
        description="entropy bonus: loss -= entropy_coef x the policy's mean entropy per response token "
        "(aggregated like the loss; 0: off; docs/algorithm.md)",
    )
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount γ")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    value_coef: float = Field(0.1, ge=0, description="GAE: weight of the value loss")
    value_clip: float = Field(0.2, gt=0, description="GAE: value clipping range around the old values")
    measure_mismatch: bool | None = Field(
        None,
        description="compute the sampler/trainer log-prob mismatch each update (one extra no-grad forward over the "
        "batch); null: on CUDA only, where the policy samples in bfloat16 (docs/algorithm.md)",
    )
    tis_cap: float | None = Field(
        None,
        gt=0,
        description="truncated importance sampling: weight each token's PPO loss by min(pi_trainer_old / "
        "pi_behaviour, tis_cap) and take the PPO ratio against pi_trainer_old (off: null; 2.0 is veRL's choice)",
    )
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
    rollback_on_degenerate: bool = Field(
        False,
        description="roll back, as kl_hard_limit does, when the policy's canary answers of a version are "
        "degenerate (policy.canary_repetition_bound, policy.canary_relevance_drop_bound): to the newest "
        "persisted version whose canary verdict was not degenerate (the SFT model when none is)",
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
