"""The trainer's loop, in the seed's order: read a batch of rollouts, KL on response tokens,
reward - beta*KL, advantage, clipped PPO epochs with gradient clipping, checkpoint, announce,
and only then acknowledge the rollouts."""
from __future__ import annotations

import collections
import logging
import pathlib
import threading
import time

import grpc
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from belay.v1 import belay_pb2, belay_pb2_grpc

from ..common.checkpoints import (latest_checkpoint, load_trainer_state, load_weights_into,
                                  optimizer_state_from_flat, optimizer_state_to_flat, prune_checkpoints, remove_unfinished,
                                  save_trainer_state, write_checkpoint)
from ..common.config import BelayConfig
from ..common.models import token_logprobs
from ..common.rollout_queue import MalformedRollout, Rollout, RolloutQueue, consumer_name
from . import ppo
from .batch import PPOBatch, collate
from .trainer_metrics import TrainerMetrics

log = logging.getLogger(__name__)
REMEMBERED_ROLLOUT_IDS = 50_000  # for de-duplication across at-least-once redelivery


class Trainer:
    def __init__(self, config: BelayConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 queue: RolloutQueue, metrics: TrainerMetrics,
                 policy: belay_pb2_grpc.PolicyStub | None = None):
        self.config, self.section = config, config.trainer
        self.model, self.tokenizer = model.train(), tokenizer
        self.device = next(model.parameters()).device
        self.queue, self.metrics, self.policy = queue, metrics, policy
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.section.lr,
                                           weight_decay=self.section.weight_decay)
        self.shuffle = torch.Generator().manual_seed(self.section.seed)
        self.version = 0
        self.consumed_ids: collections.deque[str] = collections.deque(maxlen=REMEMBERED_ROLLOUT_IDS)
        self.consumer = consumer_name()
        self.pending_cursor: str | None = "0"  # None once this consumer's pending entries are read

    # --- resume --------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest committed checkpoint, if any: weights, optimizer, RNG, version, seen ids."""
        for path in remove_unfinished(self.config.run.checkpoint_dir):
            log.warning("removed %s, a checkpoint a killed trainer never finished", path)
        latest = latest_checkpoint(self.config.run.checkpoint_dir)
        if latest is None:
            return 0
        version, path = latest
        load_weights_into(self.model, path)
        tensors, meta = load_trainer_state(path)
        optimizer_tensors = {k[len("optimizer/"):]: v for k, v in tensors.items() if k.startswith("optimizer/")}
        self.optimizer.load_state_dict(optimizer_state_from_flat(optimizer_tensors, meta["optimizer"]))
        torch.set_rng_state(tensors["rng/torch"])
        self.shuffle.set_state(tensors["rng/shuffle"])
        self.version = version
        self.consumed_ids.extend(meta["consumed_rollout_ids"])
        log.info("resumed from %s (version %d)", path, version)
        return version

    # --- reading -------------------------------------------------------------------------
    def collect(self, stop: threading.Event) -> list[tuple[str, Rollout]]:
        """batch_size fresh rollouts; stale, malformed and already-trained ones are dropped and counted."""
        batch: list[tuple[str, Rollout]] = []
        seen = set(self.consumed_ids)
        while len(batch) < self.section.batch_size and not stop.is_set():
            want = self.section.batch_size - len(batch)
            # Our own pending entries first (left by a restart), walked with a cursor; then new ones.
            entries = self.queue.read(self.consumer, want, self.config.redis.block_ms,
                                      pending=self.pending_cursor is not None, after=self.pending_cursor or "0")
            if self.pending_cursor is not None:
                self.pending_cursor = entries[-1][0] if entries else None
            for entry_id, item in entries:
                if isinstance(item, MalformedRollout):
                    self._drop(entry_id, "malformed", str(item))
                elif item.rollout_id in seen:
                    self.queue.ack([entry_id])  # trained on before a crash took the ack: not twice
                    self.metrics.dropped.labels(reason="duplicate").inc()
                elif self.version - item.policy_version > self.section.max_staleness:
                    self._drop(entry_id, "stale", f"version {item.policy_version}, trainer at {self.version}")
                else:
                    batch.append((entry_id, item))
        return batch

    def _drop(self, entry_id: str, reason: str, detail: str) -> None:
        self.queue.drop(entry_id, reason, detail)
        self.metrics.dropped.labels(reason=reason).inc()
        log.warning("dropped rollout %s (%s): %s", entry_id, reason, detail)

    # --- the update ----------------------------------------------------------------------
    def update(self, rollouts: list[Rollout]) -> dict:
        """One PPO update on a batch; returns its summary. Skips minibatches with a non-finite loss/grad."""
        section = self.section
        data = collate(rollouts, self.tokenizer.pad_token_id, self.device)
        # 1. KL between the policy that sampled and the frozen reference, response tokens only (k1).
        token_kl = ppo.per_token_kl(data.old_logprobs, data.ref_logprobs, data.response_mask)
        kl = ppo.sequence_kl(token_kl, data.response_mask)                       # (B,)
        # 2. Total reward = reward - beta * KL.
        total_reward = ppo.kl_penalised_reward(data.rewards, kl, section.kl_coef)  # (B,)
        # 3. Advantage: total reward minus its batch mean (the seed's first version; no value model).
        advantages = ppo.batch_mean_advantage(total_reward)                       # (B,)
        # 4. Clipped PPO epochs over minibatches, gradient clipping always on.
        stats = collections.defaultdict(list)
        for _ in range(section.ppo_epochs):
            order = torch.randperm(len(rollouts), generator=self.shuffle)
            for start in range(0, len(rollouts), section.minibatch_size):
                rows = order[start:start + section.minibatch_size].to(self.device)
                self._minibatch_step(data.select(rows), advantages[rows], stats)
        mask = data.response_mask.bool()
        for value in data.old_logprobs[mask].tolist():
            self.metrics.logprobs.observe(value)
        mean = lambda key: float(np.mean(stats[key])) if stats[key] else float("nan")  # noqa: E731
        return {
            "kl_per_token": float(ppo.masked_mean(token_kl, data.response_mask)),
            "kl_per_sequence": float(kl.mean()),
            "kl_coef": section.kl_coef,
            "reward_mean": float(data.rewards.mean()),
            "reward_std": float(data.rewards.std(unbiased=False)),
            "total_reward_mean": float(total_reward.mean()),
            "response_length_mean": float(data.response_lengths.mean()),
            "eos_fraction": float(np.mean([r.finish_reason == "eos" for r in rollouts])),
            "entropy": mean("entropy"), "clip_fraction": mean("clip_fraction"), "approx_kl": mean("approx_kl"),
            "loss": mean("loss"), "grad_norm": mean("grad_norm"),
            "optimizer_steps": len(stats["loss"]), "skipped_minibatches": int(sum(stats["skipped"])),
        }

    def _minibatch_step(self, data: PPOBatch, advantages: torch.Tensor, stats: dict) -> None:
        new_logprobs, entropy = token_logprobs(self.model, data.input_ids, data.attention_mask,
                                               self.section.temperature)  # (b, T-1)
        loss, info = ppo.clipped_policy_loss(new_logprobs, data.old_logprobs, advantages, data.response_mask,
                                             self.section.clip_eps)
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return self._skip(stats, f"loss is {loss.item()}")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.section.max_grad_norm)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(stats, f"gradient norm is {grad_norm.item()}")
        self.optimizer.step()
        stats["loss"].append(loss.item())
        stats["grad_norm"].append(grad_norm.item())
        stats["clip_fraction"].append(info["clip_fraction"].item())
        stats["approx_kl"].append(info["approx_kl"].item())
        stats["entropy"].append(ppo.masked_mean(entropy.detach(), data.response_mask).item())
        stats["skipped"].append(0)

    def _skip(self, stats: dict, why: str) -> None:
        log.error("non-finite update skipped: %s", why)
        self.metrics.nonfinite_skips.inc()
        stats["skipped"].append(1)

    # --- publishing ----------------------------------------------------------------------
    def save(self, version: int, consumed: list[str]) -> pathlib.Path:
        optimizer_tensors, optimizer_rest = optimizer_state_to_flat(self.optimizer.state_dict())
        tensors = {f"optimizer/{k}": v for k, v in optimizer_tensors.items()}
        tensors["rng/torch"] = torch.get_rng_state()
        tensors["rng/shuffle"] = self.shuffle.get_state()
        meta = {"version": version, "optimizer": optimizer_rest, "kl_coef": self.section.kl_coef,
                "consumed_rollout_ids": [*self.consumed_ids, *consumed][-REMEMBERED_ROLLOUT_IDS:],
                "config": self.config.model_dump(mode="json")}

        def write_files(directory: pathlib.Path) -> None:
            self.model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
            save_trainer_state(directory, tensors, meta)

        return write_checkpoint(self.config.run.checkpoint_dir, version, write_files)

    def announce(self, version: int, path: pathlib.Path) -> None:
        self.queue.publish_version(version, str(path))
        if self.policy is None:
            return
        try:  # a push to the policy; the Redis key stays the truth if this fails
            self.policy.UpdateWeights(belay_pb2.UpdateWeightsRequest(version=version, checkpoint_path=str(path)),
                                      timeout=10)
        except grpc.RpcError as error:
            log.warning("policy not told of version %d (%s); it will find it in Redis", version, error.code().name)

    def step(self, entries: list[tuple[str, Rollout]]) -> dict | None:
        """Update on a batch, checkpoint, announce, then XACK. Returns the summary (None: skipped)."""
        rollouts = [rollout for _, rollout in entries]
        started = time.perf_counter()
        summary = self.update(rollouts)
        update_seconds = time.perf_counter() - started
        if summary["optimizer_steps"] == 0:  # nothing finite to publish: keep the rollouts, refused
            for entry_id, _ in entries:
                self._drop(entry_id, "nonfinite", "every minibatch of its update was non-finite")
            return None
        version = self.version + 1
        started = time.perf_counter()
        path = self.save(version, [r.rollout_id for r in rollouts])
        self.announce(version, path)
        checkpoint_seconds = time.perf_counter() - started
        self.version = version
        self.consumed_ids.extend(r.rollout_id for r in rollouts)
        self.queue.ack([entry_id for entry_id, _ in entries])  # only now: the checkpoint holds them
        prune_checkpoints(self.config.run.checkpoint_dir, self.section.keep_checkpoints)
        timing_keys = ("generate", "reference", "reward", "swap")
        summary.update(
            version=version, rollouts=len(rollouts), time=time.time(),
            rollout_versions=sorted({r.policy_version for r in rollouts}),
            seconds={"update": update_seconds, "checkpoint": checkpoint_seconds,
                     **{k: float(np.mean([r.timings.get(k, 0.0) for r in rollouts])) for k in timing_keys}},
            sample={"prompt": rollouts[0].prompt_text, "response": rollouts[0].response_text,
                    "reward": rollouts[0].reward})
        self.metrics.record_step(summary)
        self.queue.log_step(summary)
        log.info("version %d: reward %.3f±%.3f KL/seq %.3f len %.1f loss %.4f clip %.3f (%.1f s)", version,
                 summary["reward_mean"], summary["reward_std"], summary["kl_per_sequence"],
                 summary["response_length_mean"], summary["loss"], summary["clip_fraction"], update_seconds)
        return summary

    def run(self, stop: threading.Event) -> None:
        self.queue.ensure_group()
        steps = 0
        while not stop.is_set():
            entries = self.collect(stop)
            if len(entries) < self.section.batch_size:
                break  # stopping: the partial batch stays pending and is read again after a restart
            if self.step(entries) is not None:
                steps += 1
            if self.section.max_steps and steps >= self.section.max_steps:
                break
