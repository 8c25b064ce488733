"""The trainer's loop, in the seed's order: read a batch of rollouts, KL on response tokens,
reward - beta*KL, advantage, clipped PPO epochs with gradient clipping, publish the new weights
to the policy; every few updates persist the full checkpoint in the background, and only once it
is committed acknowledge the rollouts it holds."""

from __future__ import annotations

import collections
import logging
import pathlib
import threading
import time

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from belay.v1 import belay_pb2_grpc

from ..common.checkpoints import (
    committed_versions,
    latest_valid_checkpoint,
    load_trainer_state,
    load_weights_into,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    remove_unfinished,
)
from ..common.config import BelayConfig
from ..common.lora import adapter_config, load_adapter_into, lora_settings, wrap_with_lora
from ..common.manifest import run_manifest, write_manifest
from ..common.models import (
    chosen_and_entropy,
    next_token_log_probs,
    next_token_log_probs_and_hidden_states,
    own_weights,
    resolve_dtype,
    weights_fingerprint,
)
from ..common.review_store import ReviewStore
from ..common.rollout_queue import REDIS_DOWN, MalformedRollout, Rollout, RolloutQueue, consumer_name
from ..common.sample_statistics import distinct_n, pearson, repetition
from . import ppo
from .advantages import (
    batch_mean_advantage,
    gae_advantages,
    group_advantage,
    rloo_advantage,
    sequence_advantage_to_tokens,
    token_rewards,
    whiten,
)
from .batch import PPOBatch, collate
from .detectors import RUNBOOK, Detectors
from .distributed import Distributed, decode_rollouts, encode_rollouts
from .kl import AdaptiveKLController, FixedKLController, exact_kl_from_rows, per_token_kl
from .lineage import Lineage
from .persisting import Persister, Snapshot
from .ppo import clipped_value_loss
from .publishing import Publication, Publisher, make_transport, serving_tensors
from .reward_shaping import RunningMoments, clip_reward, length_normalised_reward, truncation_penalty
from .trainer_metrics import TrainerMetrics
from .value_head import ValueHead

log = logging.getLogger(__name__)
REMEMBERED_ROLLOUT_IDS = 50_000  # for de-duplication across at-least-once redelivery
CHECKPOINT_FORMAT = 2


def review_samples(rollouts: list[Rollout], version: int) -> list[dict]:
    """What the review page shows of a batch: each rollout with its KL (k1, nats per response)."""
    now = time.time()
    return [
        {
            "rollout_id": r.rollout_id,
            "prompt": r.prompt_text,
            "response": r.response_text,
            "reward": float(r.reward),
            "kl": float(np.sum(r.logprobs) - np.sum(r.ref_logprobs)),
            "version": r.policy_version,
            "trained_into": version,
            "time": now,
        }
        for r in rollouts
    ]


class Trainer:
    def __init__(
        self,
        config: BelayConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        queue: RolloutQueue,
        metrics: TrainerMetrics,
        policy: belay_pb2_grpc.PolicyStub | None = None,
        distributed: Distributed | None = None,
    ):
        self.config, self.section = config, config.trainer
        self.distributed = distributed  # under torchrun; rank 0 alone reads Redis and writes checkpoints
        if distributed is not None and config.trainer.kl_hard_limit is not None:
            raise ValueError(
                "trainer.kl_hard_limit is not supported with data-parallel training yet: "
                "a rollback on rank 0 would leave the other ranks behind"
            )
        section = self.section
        if config.lora.enabled:  # adapters only: the base weights stay frozen, checkpoints carry adapters
            model = wrap_with_lora(model, lora_settings(config.lora))
        self.model, self.tokenizer = own_weights(model).train(), tokenizer  # the optimizer writes in place
        self.device = next(model.parameters()).device
        self.queue, self.metrics, self.policy = queue, metrics, policy
        self.review = ReviewStore(queue.redis, config.run.name) if queue is not None else None  # for the review page
        # The critic for GAE reads the policy's last hidden states (a shared trunk, as in TRL).
        self.value_head = (
            ValueHead.from_model_config(model.config).to(self.device) if section.advantage == "gae" else None
        )
        parameters = [p for p in model.parameters() if p.requires_grad]
        if self.value_head is not None:
            parameters += list(self.value_head.parameters())
        self.parameters = parameters
        # float32 master weights and AdamW moments whatever trainer.dtype says; the forward passes run
        # under autocast in it (self.forward). Why: AdamW's update lr*m/sqrt(v) is ~1e-5 of a weight,
        # below bfloat16's 8-bit mantissa, so updates applied to bf16 weights would mostly round away.
        self.compute_dtype = resolve_dtype(section.dtype, self.device)
        if section.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = torch.optim.AdamW(
            parameters, lr=section.lr, weight_decay=section.weight_decay, fused=self.device.type == "cuda"
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: ppo.lr_factor(step, section.warmup_steps, section.lr_decay_steps, section.lr_schedule),
        )
        self.kl_controller = (
            AdaptiveKLController(section.kl_coef, section.kl_target, section.kl_horizon)
            if section.kl_controller == "adaptive"
            else FixedKLController(section.kl_coef)
        )
        self.reward_moments = RunningMoments()
        self.shuffle = torch.Generator().manual_seed(section.seed)
        self.version = 0
        self.lineage = Lineage()  # staleness in updates along this trainer's history, not version numbers
        self.main_rank = distributed is None or distributed.is_main
        self.publisher = (
            Publisher(config, queue, policy, make_transport(config, self.model))
            if self.main_rank and queue is not None
            else None
        )
        self.persister = Persister(
            config.run.checkpoint_dir,
            section.keep_checkpoints,
            section.checkpoint_every_steps,
            section.checkpoint_every_seconds,
            queue,
            self.until_redis_answers,
            self.write_model_files,
        )
        self.persister.on_persisted = metrics.persist_seconds.observe
        self.persister.on_failure = metrics.persist_failures.inc
        metrics.watch_persister(self.persister, section.checkpoint_every_steps, section.checkpoint_every_seconds)
        self.consumed_ids: collections.deque[str] = collections.deque(maxlen=REMEMBERED_ROLLOUT_IDS)
        self.consumer = consumer_name()
        self.pending_cursor: str | None = "0"  # None once this consumer's pending entries are read
        self.partial_groups: dict[str, list[tuple[str, Rollout]]] = {}  # group baselines need whole groups
        self.good_versions: set[int] = {0}  # versions whose samples stayed under kl_hard_limit (0: the SFT model)
        self.detectors = Detectors.from_config(section)  # the seed's quiet failure modes, over recent updates
        self.metrics.record_detector_bounds(self.detectors.bounds)

    # --- the run's manifest ---------------------------------------------------------------
    def write_run_manifest(self) -> pathlib.Path:
        """checkpoint_dir/run_manifest.json: config, packages, fingerprints, seeds, git revision."""
        path = pathlib.Path(self.config.run.checkpoint_dir) / "run_manifest.json"
        manifest = run_manifest(
            self.config.model_dump(mode="json"),
            {"policy_start": weights_fingerprint(self.model), "version_start": str(self.version)},
            {"trainer": self.section.seed, "policy": self.config.policy.seed},
        )
        write_manifest(path, manifest)
        return path

    # --- resume --------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest committed checkpoint, if any: weights, optimizer, RNG, version, seen ids."""
        if self.distributed is None or self.distributed.is_main:  # the one writer cleans up after itself
            for path in remove_unfinished(self.config.run.checkpoint_dir):
                log.warning("removed %s, a checkpoint a killed trainer never finished", path)
        latest = latest_valid_checkpoint(self.config.run.checkpoint_dir, log)
        if latest is None:
            return 0
        version, path = latest
        tensors, meta = load_trainer_state(path)
        if meta.get("format", 1) > CHECKPOINT_FORMAT:  # 1: a checkpoint per version; 2: lineage, persist cadence
            raise ValueError(
                f"{path} was written in checkpoint format {meta['format']} by a newer Belay; this "
                f"trainer reads formats 1 to {CHECKPOINT_FORMAT}: resume it with that version or newer"
            )
        if self.config.lora.enabled:
            load_adapter_into(self.model, path)
        else:
            load_weights_into(self.model, path)
        if self.value_head is not None:
            self.value_head.load_state_dict(
                {k[len("value_head/") :]: v for k, v in tensors.items() if k.startswith("value_head/")}
            )
        self.scheduler.load_state_dict(meta["scheduler"])
        self.kl_controller.load_state_dict(meta["kl_controller"])
        self.reward_moments.load_state_dict(meta["reward_moments"])
        self.good_versions = set(meta.get("good_versions", [0]))
        optimizer_tensors = {k[len("optimizer/") :]: v for k, v in tensors.items() if k.startswith("optimizer/")}
        self.optimizer.load_state_dict(optimizer_state_from_flat(optimizer_tensors, meta["optimizer"]))
        torch.set_rng_state(tensors["rng/torch"])
        self.shuffle.set_state(tensors["rng/shuffle"])
        self.version = version
        self.lineage = Lineage.from_state(meta.get("lineage"), version)  # absent before format 2: numbers
        self.persister.persisted_version = version
        self.consumed_ids.extend(meta["consumed_rollout_ids"])
        log.info("resumed from %s (version %d)", path, version)
        return version

    def publish_at_start(self) -> None:
        """A resumed (or restarted) trainer publishes at once, so no replica keeps sampling from
        weights that were never persisted. Versions only grow: when an earlier trainer published
        past the persisted version P, the weights of P go out as a new version above all of them,
        and the versions in between become orphans of this lineage (see Lineage.staleness)."""
        published = self.until_redis_answers(self.queue.latest_version, "reading the published version")[0]
        if published > self.version:
            log.warning(
                "versions %d..%d were published but never persisted; version %d (persisted) is published "
                "again as version %d",
                self.version + 1,
                published,
                self.version,
                published + 1,
            )
            self.lineage.orphans_after(self.version, published)
            self.lineage.republish(self.version, published + 1)
            self.version = published + 1
        if self.version > 0 or published > 0:
            self.publish(self.version)

    # --- reading -------------------------------------------------------------------------
    def collect(self, stop: threading.Event) -> list[tuple[str, Rollout]]:
        """batch_size fresh rollouts; stale, malformed and already-trained ones are dropped and counted."""
        batch: list[tuple[str, Rollout]] = []
        seen = set(self.consumed_ids)
        self._take_whole_groups(batch)  # groups completed during the last collect come first
        while len(batch) < self.section.batch_size and not stop.is_set():
            if self.publisher is not None:  # the model is the latest published version: late replicas get it
                self.publisher.catch_up(self.version, self.model)
            want = self.section.batch_size - len(batch)
            # Our own pending entries first (left by a restart), walked with a cursor; then entries a
            # dead trainer left (claimed after claim_idle_ms); then new ones.
            entries = self.queue.read(
                self.consumer,
                want,
                self.config.redis.block_ms,
                pending=self.pending_cursor is not None,
                after=self.pending_cursor or "0",
            )
            if self.pending_cursor is not None:
                self.pending_cursor = entries[-1][0] if entries else None
                if self.pending_cursor is None:  # own pending done: take over what others abandoned
                    claimed = self.queue.claim_abandoned(self.consumer, self.config.redis.claim_idle_ms, want)
                    if claimed:
                        log.warning("claimed %d rollouts a dead trainer left unacknowledged", len(claimed))
                        self.pending_cursor = "0"  # claimed entries are now our pending ones: walk them
                        continue
            held = {e for e, _ in batch} | {e for group in self.partial_groups.values() for e, _ in group}
            read_at = time.time()
            for entry_id, item in entries:
                if entry_id in held:  # re-delivered while we hold it (e.g. claimed back from ourselves)
                    continue
                if isinstance(item, Rollout):  # time in the stream, from the actor's XADD to this read
                    item.timings["queue"] = max(0.0, read_at - item.timings.get("enqueued_at", read_at))
                if self.persister.holds(entry_id):  # trained into a published version; its persist will ack it
                    continue
                if isinstance(item, MalformedRollout):
                    self._drop(entry_id, "malformed", str(item))
                elif item.rollout_id in seen:
                    self.queue.ack([entry_id])  # trained on before a crash took the ack: not twice
                    self.metrics.dropped.labels(reason="duplicate").inc()
                elif (staleness := self.lineage.staleness(item.policy_version)) is None:
                    self._drop(
                        entry_id,
                        "orphaned",
                        f"version {item.policy_version} is on no branch this trainer "
                        f"knows (published by a trainer that died before persisting it, then superseded)",
                    )
                elif staleness > self.section.max_staleness:
                    self._drop(
                        entry_id,
                        "stale",
                        f"version {item.policy_version} is {staleness} updates behind version {self.version}",
                    )
                elif self.section.advantage in ("group", "rloo"):
                    self.partial_groups.setdefault(item.group_id, []).append((entry_id, item))
                else:
                    batch.append((entry_id, item))
            self._take_whole_groups(batch)
        return batch

    def _take_whole_groups(self, batch: list[tuple[str, Rollout]]) -> None:
        """Move complete groups into the batch while they fit; the rest wait (still pending) for the next."""
        for group_id, members in list(self.partial_groups.items()):
            whole = len(members) == members[0][1].group_size
            if whole and len(batch) + len(members) <= self.section.batch_size:
                batch.extend(self.partial_groups.pop(group_id))

    def _drop(self, entry_id: str, reason: str, detail: str) -> None:
        self.queue.drop(entry_id, reason, detail)
        self.metrics.dropped.labels(reason=reason).inc()
        log.warning("dropped rollout %s (%s): %s", entry_id, reason, detail)

    # --- the update ----------------------------------------------------------------------
    def shape_rewards(self, data: PPOBatch) -> torch.Tensor:
        """Raw scores -> the reward PPO maximises, in this order: running normalisation, clipping,
        length normalisation, truncation penalty (each off unless configured). (B,) -> (B,)"""
        section, rewards = self.section, data.rewards
        if section.reward_normalize:
            self.reward_moments.update(rewards)
            rewards = self.reward_moments.normalise(rewards)
        if section.reward_clip is not None:
            rewards = clip_reward(rewards, section.reward_clip)
        if section.length_normalize:
            rewards = length_normalised_reward(rewards, data.response_lengths)
        if section.truncation_penalty:
            rewards = truncation_penalty(rewards, data.truncated, section.truncation_penalty)
        return rewards

    def token_kl(self, logprobs: torch.Tensor, data: PPOBatch, log_probs: torch.Tensor | None) -> torch.Tensor:
        """KL(policy || reference) per response token with the configured estimator. (B, T) -> (B, T)"""
        if self.section.kl_estimator != "full":
            return per_token_kl(self.section.kl_estimator, logprobs, data.ref_logprobs, data.response_mask)
        if data.ref_top_ids.shape[-1] == 0:
            raise ValueError("kl_estimator 'full' needs rollouts carrying the reference's top-k rows")
        policy_rows = torch.gather(log_probs, -1, data.ref_top_ids)  # (B, T, K) the policy on the same ids
        full_vocabulary = data.ref_top_ids.shape[-1] == log_probs.shape[-1]
        return exact_kl_from_rows(
            policy_rows, data.ref_top_logprobs, data.response_mask, renormalise=not full_vocabulary
        )

    def forward(self, data: PPOBatch):
        """The policy (and critic) on a batch: (logprobs, entropy, full log-probs, values or None)."""
        model, ids, attention, temperature = self.model, data.input_ids, data.attention_mask, self.section.temperature
        with torch.autocast(self.device.type, self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            if self.value_head is None:
                log_probs, hidden = next_token_log_probs(model, ids, attention, temperature), None
            else:
                log_probs, hidden = next_token_log_probs_and_hidden_states(model, ids, attention, temperature)
        logprobs, entropy = chosen_and_entropy(log_probs, data.input_ids)
        values = self.value_head(hidden.float()) if hidden is not None else None
        return logprobs, entropy, log_probs, values

    def update(self, rollouts: list[Rollout]) -> dict:
        """One PPO update on a batch; returns its summary. Skips minibatches with a non-finite loss/grad."""
        section = self.section
        data = collate(rollouts, self.tokenizer.pad_token_id, self.device)
        mask = data.response_mask
        beta = self.kl_controller.value
        # 1. The reward: raw scores, shaped as configured (the seed's default: unchanged).
        scores = self.shape_rewards(data)
        # 2. The policy as it stands (= the weights that sampled, for fresh rollouts): old values for
        #    the critic and the policy's full distribution for the exact KL; skipped when neither is used.
        old_values = None
        if self.value_head is not None or section.kl_estimator == "full":
            with torch.no_grad():
                _, _, log_probs, old_values = self.forward(data)
        else:
            log_probs = None
        # 3. KL between the policy that sampled and the frozen reference, response tokens only.
        token_kl = self.token_kl(data.old_logprobs, data, log_probs)  # (B, T)
        kl = ppo.sequence_kl(token_kl, mask)  # (B,)
        # 4. Total reward = reward − β·KL (when the KL is paid in the reward), and the advantage.
        reward_beta = beta if section.kl_placement == "reward" else 0.0
        returns = None
        if section.advantage == "gae":
            rewards_t = token_rewards(scores, token_kl, reward_beta, mask)
            advantages, returns = gae_advantages(rewards_t, old_values, mask, section.gamma, section.lam)
            total_reward = scores - reward_beta * kl
        else:
            total_reward = ppo.kl_penalised_reward(scores, kl, reward_beta)  # (B,)
            if section.advantage == "batch_mean":
                sequence_advantages = batch_mean_advantage(total_reward)
            elif section.advantage == "group":
                sequence_advantages = group_advantage(total_reward, data.group_index, section.group_scale_by_std)
            else:
                sequence_advantages = rloo_advantage(total_reward, data.group_index)
            advantages = sequence_advantage_to_tokens(sequence_advantages, mask)  # (B, T)
        if section.whiten_advantages:
            advantages = whiten(advantages, mask)
        # 5. Clipped PPO epochs over minibatches, gradient clipping always on.
        stats = collections.defaultdict(list)
        targets = {"advantages": advantages, "returns": returns, "old_values": old_values}
        stopped_early = False
        for _epoch in range(section.ppo_epochs):
            order = torch.randperm(len(rollouts), generator=self.shuffle)
            for start in range(0, len(rollouts), section.minibatch_size):
                rows = order[start : start + section.minibatch_size]
                if self.distributed is not None:  # each rank its share; gradients averaged in the step
                    rows = rows[self.distributed.rank :: self.distributed.world_size]
                rows = rows.to(self.device)
                self._minibatch_step(
                    data.select(rows), {k: None if v is None else v[rows] for k, v in targets.items()}, beta, stats
                )
                if section.early_stop_kl is not None and stats["approx_kl"]:
                    approx_kl = stats["approx_kl"][-1]
                    if self.distributed is not None:  # every rank must take the same decision
                        approx_kl = self.distributed.mean(approx_kl)
                    if approx_kl > section.early_stop_kl:
                        stopped_early = True
                        break
            if stopped_early:
                break
        # 6. β for the next update (the adaptive controller moves it towards the target KL).
        kl_coef_next = self.kl_controller.update(float(kl.mean()), len(rollouts))
        for value in data.old_logprobs[mask.bool()].tolist():
            self.metrics.logprobs.observe(value)
        mean = lambda key: float(np.mean(stats[key])) if stats[key] else float("nan")  # noqa: E731
        return {
            "kl_per_token": float(ppo.masked_mean(token_kl, mask)),
            "kl_per_sequence": float(kl.mean()),
            "kl_coef": beta,
            "kl_coef_next": kl_coef_next,
            "reward_mean": float(data.rewards.mean()),
            "reward_std": float(data.rewards.std(unbiased=False)),
            "shaped_reward_mean": float(scores.mean()),
            "total_reward_mean": float(total_reward.mean()),
            "response_length_mean": float(data.response_lengths.mean()),
            "eos_fraction": float((~data.truncated).float().mean()),
            # the seed's quiet failure modes: a reward that favours length, responses collapsing onto templates
            "reward_length_correlation": pearson(data.rewards.tolist(), data.response_lengths.tolist()),
            "distinct_2": distinct_n([r.response_text for r in rollouts], 2),
            "repetition_3": float(np.mean([repetition(r.response_text, 3) for r in rollouts])),
            "entropy": mean("entropy"),
            "clip_fraction": mean("clip_fraction"),
            "approx_kl": mean("approx_kl"),
            "loss": mean("loss"),
            "grad_norm": mean("grad_norm"),
            "value_loss": mean("value_loss"),
            "lr": self.scheduler.get_last_lr()[0],
            "first_minibatch_max_log_ratio": stats["first_minibatch_max_log_ratio"][0]
            if stats["first_minibatch_max_log_ratio"]
            else float("nan"),
            "early_stopped": stopped_early,
            "optimizer_steps": len(stats["loss"]),
            "skipped_minibatches": int(sum(stats["skipped"])),
        }

    def _minibatch_step(self, data: PPOBatch, targets: dict, beta: float, stats: dict) -> None:
        section, mask = self.section, data.response_mask
        new_logprobs, entropy, log_probs, values = self.forward(data)
        if not stats["first_minibatch_max_log_ratio"]:  # 1 for fresh rollouts: a check on the whole pipeline
            stats["first_minibatch_max_log_ratio"].append(
                float(((new_logprobs - data.old_logprobs).abs() * mask).max().detach())
            )
        loss, info = ppo.clipped_policy_loss(
            new_logprobs, data.old_logprobs, targets["advantages"], mask, section.clip_eps, section.loss_aggregation
        )
        if section.kl_placement == "loss":  # GRPO style: the KL of the policy being trained, as a loss term
            kl_loss = ppo.aggregate_loss(self.token_kl(new_logprobs, data, log_probs), mask, section.loss_aggregation)
            loss = loss + beta * kl_loss
        if values is not None:
            value_loss, _ = clipped_value_loss(
                values, targets["old_values"], targets["returns"], mask, section.value_clip
            )
            loss = loss + section.value_coef * value_loss
            stats["value_loss"].append(value_loss.item())
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if self.distributed is not None:
            finite = self.distributed.all_true(finite)  # one rank's NaN skips the step on all of them
        if not finite:
            return self._skip(stats, f"loss is {loss.item()}")
        loss.backward()
        if self.distributed is not None:
            self.distributed.average_gradients(self.parameters)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, section.max_grad_norm)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(stats, f"gradient norm is {grad_norm.item()}")
        self.optimizer.step()
        self.scheduler.step()
        stats["loss"].append(loss.item())
        stats["grad_norm"].append(grad_norm.item())
        stats["clip_fraction"].append(info["clip_fraction"].item())
        stats["approx_kl"].append(info["approx_kl"].item())
        stats["entropy"].append(ppo.masked_mean(entropy.detach(), mask).item())
        stats["skipped"].append(0)

    def _skip(self, stats: dict, why: str) -> None:
        log.error("non-finite update skipped: %s", why)
        self.metrics.nonfinite_skips.inc()
        stats["skipped"].append(1)

    # --- publish and persist -----------------------------------------------------------------
    def publish(self, version: int):
        """The weights the policy serves, through the weight transport, announced with the count of
        trained rollouts still awaiting their persist (the actor's production bound leaves them out)."""
        if self.publisher is None:  # no queue (the bench's in-process mode): nobody to hand weights to
            return Publication(version, "", "none", 0, 0.0)
        publication = self.publisher.publish(version, self.model, self.persister.awaiting(), self.until_redis_answers)
        self.metrics.record_publication(publication)
        return publication

    def snapshot(self, version: int) -> Snapshot:
        """Copies of everything the checkpoint holds, taken between updates (the persist writes them later)."""
        optimizer_tensors, optimizer_rest = optimizer_state_to_flat(self.optimizer.state_dict())
        state = {f"optimizer/{k}": v for k, v in optimizer_tensors.items()}
        if self.value_head is not None:
            state.update({f"value_head/{k}": v for k, v in self.value_head.state_dict().items()})
        weights = serving_tensors(self.model, self.config.lora.enabled)
        copied = self.persister.buffers.copy({**{f"weights/{k}": v for k, v in weights.items()}, **state})
        state = {k: copied[k] for k in state}
        state["rng/torch"] = torch.get_rng_state()
        state["rng/shuffle"] = self.shuffle.get_state()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": version,
            "optimizer": optimizer_rest,
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "good_versions": sorted(self.good_versions),
            "lineage": self.lineage.state(),
            "consumed_rollout_ids": list(self.consumed_ids)[-REMEMBERED_ROLLOUT_IDS:],
            "config": self.config.model_dump(mode="json"),
        }
        return Snapshot(
            version=version,
            weights={k: copied[f"weights/{k}"] for k in weights},
            state=state,
            meta=meta,
            adapter_config=adapter_config(self.model) if self.config.lora.enabled else None,
        )

    def write_model_files(self, directory: pathlib.Path) -> None:
        """Beside the weights: what makes a checkpoint a Hugging Face model directory (belay eval loads it)."""
        if not self.config.lora.enabled:
            self.model.config.to_json_file(directory / "config.json")
            if getattr(self.model, "generation_config", None) is not None:
                self.model.generation_config.to_json_file(directory / "generation_config.json")
        self.tokenizer.save_pretrained(directory)

    def persist(self, wait: bool = False) -> float:
        """Snapshot now, write in the background (wait=True: and wait for it). Returns the seconds on
        this thread: the snapshot's copies, plus waiting for a previous persist still in flight."""
        started = time.perf_counter()
        self.persister.start(self.snapshot(self.version))
        if wait:
            self.persister.wait()
        return time.perf_counter() - started

    def save(self, version: int, consumed: list[str]) -> pathlib.Path:
        """Persist `version` now and wait for it (the bench's in-process mode and tests)."""
        self.version = version
        self.consumed_ids.extend(consumed)
        self.persist(wait=True)
        return pathlib.Path(self.config.run.checkpoint_dir) / f"v{version:06d}"

    def step(self, entries: list[tuple[str, Rollout]]) -> dict | None:
        """Update on a batch, publish, persist when due. Returns the summary (None: skipped)."""
        rollouts = [rollout for _, rollout in entries]
        limit = self.section.kl_hard_limit
        if limit is not None:
            batch_kl = float(np.mean([float(r.logprobs.sum() - r.ref_logprobs.sum()) for r in rollouts]))
            if batch_kl > limit:  # the version that sampled these went too far from the reference
                return self.roll_back(entries, batch_kl)
            self.good_versions.update(r.policy_version for r in rollouts)
        started = time.perf_counter()
        summary = self.update(rollouts)
        update_seconds = time.perf_counter() - started
        if summary["optimizer_steps"] == 0:  # nothing finite to publish: keep the rollouts, refused
            for entry_id, _ in entries:
                self._drop(entry_id, "nonfinite", "every minibatch of its update was non-finite")
            return None
        version = self.version + 1
        self.version = version
        self.lineage.advance(version)
        self.consumed_ids.extend(r.rollout_id for r in rollouts)
        # Publish (critical path), then persist when due (a snapshot here, the writing in the background).
        # The rollouts stay pending in Redis until a committed checkpoint holds them: a crash before
        # that redelivers them, and the resumed trainer trains them once into its lineage.
        self.persister.trained_into_published([entry_id for entry_id, _ in entries])
        publication = self.publish(version)
        persist_seconds = self.persist() if self.persister.due() else 0.0
        timing_keys = ("generate", "logprobs", "reference", "reward", "queue", "swap")
        summary.update(
            version=version,
            rollouts=len(rollouts),
            time=time.time(),
            rollout_versions=sorted({r.policy_version for r in rollouts}),
            reward_model_ids=sorted({r.reward_model_id for r in rollouts}),
            reward_components={
                name: float(np.mean([r.reward_components[name] for r in rollouts if name in r.reward_components]))
                for name in sorted({n for r in rollouts for n in r.reward_components})
            },
            publish_bytes=publication.bytes,
            persisted_version=self.persister.persisted_version,
            seconds={
                "update": update_seconds,
                "publish": publication.seconds,
                "persist": persist_seconds,
                "persist_background": self.persister.last_write_seconds,
                **{k: float(np.mean([r.timings.get(k, 0.0) for r in rollouts])) for k in timing_keys},
            },
            sample={
                "prompt": rollouts[0].prompt_text,
                "response": rollouts[0].response_text,
                "reward": rollouts[0].reward,
            },
        )
        self.metrics.record_step(summary)
        self.watch_for_failures(summary, rollouts)
        self.until_redis_answers(lambda: self.queue.log_step(summary), "logging the step")
        if self.review is not None:
            self.until_redis_answers(
                lambda: self.review.record_samples(review_samples(rollouts, version)), "recording samples for review"
            )
        log.info(
            "version %d: reward %.3f±%.3f KL/seq %.3f len %.1f loss %.4f clip %.3f (%.1f s)",
            version,
            summary["reward_mean"],
            summary["reward_std"],
            summary["kl_per_sequence"],
            summary["response_length_mean"],
            summary["loss"],
            summary["clip_fraction"],
            update_seconds,
        )
        return summary

    def watch_for_failures(self, summary: dict, rollouts: list[Rollout]) -> None:
        """The failure detectors (detectors.py) on this update: their values and the names of those
        firing go into the summary and /metrics; one starting to fire is logged with its runbook line."""
        values, firing, started = self.detectors.observe(
            summary, [r.prompt_text for r in rollouts], [r.response_text for r in rollouts]
        )
        summary.update(values, detectors_firing=[name for name, on in firing.items() if on])
        self.metrics.record_detectors(values, firing)
        for name in started:
            log.warning("failure detector %s is firing at version %d: %s", name, summary["version"], RUNBOOK[name])

    def roll_back(self, entries: list[tuple[str, Rollout]], batch_kl: float) -> dict:
        """The rail: restore the newest good version that was persisted (published weights are not
        kept), publish it as a new version (the policy swaps back), raise β or lower the learning
        rate, and drop the batch with its reason. With no good version persisted yet, the target is
        the SFT model, and the log says so."""
        section = self.section
        worst = min(r.policy_version for _, r in entries)
        self.persister.wait()  # a persist in flight may be the good version to return to
        checkpoints = dict(committed_versions(self.config.run.checkpoint_dir))
        persisted_good = [v for v in self.good_versions if v < worst and v in checkpoints]
        target = max(persisted_good, default=0)
        if target == 0:
            log.warning(
                "no good version below %d is persisted (checkpoint_every_steps=%d): rolling back to the SFT model",
                worst,
                section.checkpoint_every_steps,
            )
        if target == 0 and self.config.lora.enabled:
            with torch.no_grad():  # zero adapters: exactly the base model
                for name, parameter in self.model.named_parameters():
                    if "lora_B" in name:
                        parameter.zero_()
        elif target == 0:
            load_weights_into(self.model, section.model_dir)
        elif self.config.lora.enabled:
            load_adapter_into(self.model, checkpoints[target])
        else:
            load_weights_into(self.model, checkpoints[target])
        self.optimizer.state.clear()  # the moments steered towards the bad version
        if section.kl_limit_action == "raise_beta":
            self.kl_controller.value *= section.kl_limit_factor
        else:
            self.scheduler.base_lrs = [lr / section.kl_limit_factor for lr in self.scheduler.base_lrs]
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr / section.kl_limit_factor
        version = self.version + 1
        self.version = version
        self.lineage.advance(version)
        self.good_versions.add(version)
        self.publish(version)
        self.persist()  # at once: the restored weights and the raised β or lowered lr are the new base
        for entry_id, _ in entries:
            self._drop(entry_id, "kl_limit", f"batch KL {batch_kl:.2f} nats > kl_hard_limit {section.kl_hard_limit}")
        self.metrics.rollbacks.inc()
        summary = {
            "event": "rollback",
            "version": version,
            "rolled_back_to": target,
            "batch_kl": batch_kl,
            "kl_coef": self.kl_controller.value,
            "lr": self.optimizer.param_groups[0]["lr"],
            "time": time.time(),
        }
        self.until_redis_answers(lambda: self.queue.log_step(summary), "logging the rollback")
        log.warning(
            "KL %.2f nats per response > kl_hard_limit %.2f: rolled back to version %d, published as "
            "version %d; %s now %s",
            batch_kl,
            section.kl_hard_limit,
            target,
            version,
            "β" if section.kl_limit_action == "raise_beta" else "lr",
            summary["kl_coef"] if section.kl_limit_action == "raise_beta" else summary["lr"],
        )
        return summary

    def until_redis_answers(self, action, what: str, stop: threading.Event | None = None):
        """Run a Redis action, waiting out a Redis restart with back-off (a version already published
        must still be announced, a committed checkpoint's rollouts acknowledged: they stay pending meanwhile)."""
        delay = 0.5
        while True:
            try:
                return action()
            except REDIS_DOWN as error:
                log.warning("Redis unavailable while %s (%s); retrying in %.1f s", what, error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)
                if stop is not None and stop.is_set():
                    raise

    def run(self, stop: threading.Event) -> None:
        if self.distributed is not None and not self.distributed.is_main:
            return self.run_follower()
        self.until_redis_answers(self.queue.ensure_group, "creating the consumer group", stop)
        self.publish_at_start()
        steps = 0
        while not stop.is_set():
            try:
                entries = self.collect(stop)
            except REDIS_DOWN as error:  # the partial batch is still pending in Redis: read it again
                log.warning("Redis unavailable while reading rollouts (%s); retrying", error)
                self.pending_cursor, self.partial_groups = "0", {}
                stop.wait(1.0)
                continue
            if len(entries) < self.section.batch_size:
                break  # stopping: the partial batch stays pending and is read again after a restart
            if self.distributed is not None:
                self.distributed.broadcast_bytes(encode_rollouts([r for _, r in entries]))
            if self.step(entries) is not None:
                steps += 1
            if self.distributed is not None:
                self.after_distributed_step()
            if self.section.max_steps and steps >= self.section.max_steps:
                break
        if self.distributed is not None:
            self.distributed.broadcast_bytes(b"")  # tells the other ranks to stop
        self.finish()

    def finish(self) -> None:
        """At max_steps or SIGTERM: persist what is not persisted yet and wait for it; then the
        published copies can go (a restarted policy loads the persisted version)."""
        if self.persister.persisted_version != self.version or self.persister.awaiting():
            self.persist(wait=True)
        else:
            self.persister.wait()
        if self.publisher is not None:
            self.publisher.close(remove=self.persister.persisted_version == self.version, newest=self.version)

    def run_follower(self) -> None:
        """A rank other than 0: train on each batch rank 0 broadcasts, until it sends nothing."""
        while payload := self.distributed.broadcast_bytes(None):
            if self.update(decode_rollouts(payload))["optimizer_steps"]:
                self.version += 1
            self.after_distributed_step()

    def after_distributed_step(self) -> None:
        """Wait for rank 0's publish; at DEBUG, log this rank's weights so identical replicas can be checked."""
        self.distributed.barrier()
        if log.isEnabledFor(logging.DEBUG):  # hashing every weight costs ~0.5 s on 135M: only when asked
            log.debug(
                "rank %d weights after version %d: %s",
                self.distributed.rank,
                self.version,
                weights_fingerprint(self.model)[:16],
            )
