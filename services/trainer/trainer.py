"""The trainer's loop, in the seed's order: read a batch of rollouts, KL on response tokens,
reward - beta*KL, advantage, clipped PPO epochs with gradient clipping, publish the new weights
to the policy; every few updates persist the full checkpoint in the background, and only once it
is committed acknowledge the rollouts it holds.

The Trainer holds the training state and wires the parts, each in its own module: intake.py
(reading batches from Redis), update.py (the PPO update), rails.py (the KL and canary rollbacks),
resume.py (what a checkpoint holds, and coming back from one), publishing.py and persisting.py (the
weight hand-off), monitoring.py (metrics, the steps stream, the detectors, TensorBoard, the review
page's samples), best_version.py (the best evaluated version), following.py (torchrun ranks)."""

from __future__ import annotations

import collections
import functools
import json
import logging
import pathlib
import threading
import time

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from belay.v1 import belay_pb2_grpc

from ..common.config import BelayConfig
from ..common.lora import lora_settings, wrap_with_lora
from ..common.manifest import run_manifest, write_manifest
from ..common.models import own_weights, resolve_dtype, weights_fingerprint
from ..common.review_store import ReviewStore
from ..common.rollout_queue import REDIS_DOWN, Rollout, RolloutQueue
from ..common.step_records import RollbackRecord, Sample, StageSeconds, StepRecord, UpdateStats
from . import following, gathering, meta_start, monitoring, parallel, ppo, rails, resume, sharded_persist, update
from .best_version import BestVersion
from .detectors import Detectors
from .distributed import Distributed, encode_rollouts
from .intake import Entry, Intake
from .kl import AdaptiveKLController, FixedKLController
from .lineage import Lineage
from .loss_scale import LossScale
from .parallel import Learner
from .persisting import Persister
from .publishing import Publication, Publisher, make_transport
from .retry import until_redis_answers
from .reward_shaping import RunningMoments
from .tensorboard_log import TensorBoardLog
from .trainer_metrics import TrainerMetrics
from .value_head import ValueHead

log = logging.getLogger(__name__)
ROLLOUT_STAGES = ("generate", "logprobs", "reference", "reward", "queue", "swap")  # timed by the actor, per rollout


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
        # Under torchrun; rank 0 alone reads Redis, writes checkpoints and decides rollbacks (the others follow).
        self.distributed = distributed
        if config.lora.enabled:  # adapters only: the base weights stay frozen, checkpoints carry adapters
            model = wrap_with_lora(model, lora_settings(config.lora))
        self.model, self.tokenizer = own_weights(model).train(), tokenizer  # the optimizer writes in place
        self.device = meta_start.weights_device(model)  # under fsdp the parameters may be empty (meta_start.py)
        self.queue, self.metrics, self.policy = queue, metrics, policy
        self.main_rank = distributed is None or distributed.is_main
        self.build_learner()
        if self.sharded and self.section.weight_transport == "cuda_ipc":
            raise ValueError(
                "trainer.weight_transport 'cuda_ipc' sends CUDA tensors, but under trainer.parallelism 'fsdp' the "
                "whole weights are gathered to rank 0's CPU memory: use weight_transport 'file' or 'broadcast'"
            )
        # What publishing and persisting read: the live model, or under fsdp the whole weights gathered to
        # rank 0 after each update (gathering.py). Under fsdp AdamW and the critic persist as each rank's
        # shards (sharded_persist.py): the optimizer's JSON half waits here for rank 0's snapshot.
        self.full_model, self.sharded_optimizer_rest, self.shard_write_seconds = self.model, None, 0.0
        self.version = 0
        self.lineage = Lineage()  # staleness in updates along this trainer's history, not version numbers
        self.good_versions: set[int] = {0}  # versions whose samples stayed under kl_hard_limit (0: the SFT model)
        self.rolled_back_at = 0  # the version the last rollback published (canary verdicts up to it are settled)
        self.consumed_ids: collections.deque[str] = collections.deque(maxlen=resume.REMEMBERED_ROLLOUT_IDS)
        self.build_hand_off()
        self.intake = Intake(config, queue, metrics, self.persister)
        self.review = ReviewStore(queue.redis, config.run.name) if queue is not None else None  # for the review page
        self.tensorboard = TensorBoardLog.from_config(config, self.review) if self.main_rank else None
        marks_best = self.main_rank and self.review is not None and config.trainer.eval_every
        self.best = (
            BestVersion(config.run.checkpoint_dir, self.review, config.trainer.eval_metric) if marks_best else None
        )
        self.detectors = Detectors.from_config(self.section)  # the seed's quiet failure modes, over recent updates
        metrics.record_detector_bounds(self.detectors.bounds)
        metrics.watch_loss_scale(self.loss_scale)

    def build_learner(self) -> None:
        """What the update changes: the policy's trainable weights, the critic, AdamW, the schedule,
        the KL controller, the reward normaliser and the minibatch shuffle."""
        section = self.section
        # The critic for GAE reads the policy's last hidden states (a shared trunk, as in TRL).
        self.value_head = (
            ValueHead.from_model_config(self.model.config).to(self.device) if section.advantage == "gae" else None
        )
        # float32 master weights and AdamW moments whatever trainer.dtype says; the forward passes run
        # under autocast in it (update.forward). Why: AdamW's update lr*m/sqrt(v) is ~1e-5 of a weight,
        # below bfloat16's 8-bit mantissa, so updates applied to bf16 weights would mostly round away.
        self.compute_dtype = resolve_dtype(section.dtype, self.device)
        self.loss_scale = LossScale.for_dtype(self.compute_dtype)  # float16 only (loss_scale.py)
        if section.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Under torchrun: DDP or FSDP2 (parallel.py), which reduce the gradients in backward. The
        # optimizer comes after: FSDP2 turns the parameters into DTensors (this rank's shards).
        parallelism = section.parallelism if self.distributed is not None else None
        self.learner = parallel.wrap(Learner(self.model, self.value_head), parallelism, self.device, self.compute_dtype)
        self.sharded = parallelism == "fsdp"
        if meta_start.is_empty(self.model):  # built empty under fsdp: this rank's shards get memory and their rows
            meta_start.fill(self, section.model_dir)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        if self.value_head is not None:
            self.parameters += list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=section.lr, weight_decay=section.weight_decay, fused=self.device.type == "cuda"
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

    def build_hand_off(self) -> None:
        """The publisher (rank 0, with a queue) and the background persister, with their metrics."""
        config, section, metrics = self.config, self.section, self.metrics
        self.publisher = (
            Publisher(config, self.queue, self.policy, make_transport(config, self.model))
            if self.main_rank and self.queue is not None
            else None
        )
        self.persister = Persister(
            config.run.checkpoint_dir,
            section.keep_checkpoints,
            section.checkpoint_every_steps,
            section.checkpoint_every_seconds,
            self.queue,
            until_redis_answers,
            functools.partial(resume.write_model_files, self.model, self.tokenizer, config.lora.enabled),
        )
        self.persister.on_persisted = metrics.persist_seconds.observe
        self.persister.on_failure = metrics.persist_failures.inc
        metrics.watch_persister(self.persister, section.checkpoint_every_steps, section.checkpoint_every_seconds)
        if self.publisher is not None:
            metrics.watch_transport(self.publisher.transport)

    def write_run_manifest(self) -> pathlib.Path:
        """checkpoint_dir/run_manifest.json: config, packages, fingerprints, seeds, git revision."""
        path = pathlib.Path(self.config.run.checkpoint_dir) / "run_manifest.json"
        manifest = run_manifest(
            self.config.model_dump(mode="json"),
            {"policy_start": weights_fingerprint(self.full_model), "version_start": str(self.version)},
            {"trainer": self.section.seed, "policy": self.config.policy.seed},
        )
        write_manifest(path, manifest)
        return path

    def resume(self) -> int:
        """Load the newest committed checkpoint, if any (resume.py). Returns its version (0: none)."""
        version = resume.restore(self)
        if self.sharded:  # every rank: the whole weights to rank 0, for the manifest and the first publish
            gathering.gather_weights(self)
        return version

    def publish_at_start(self) -> None:
        """Publish at once after a (re)start, above every version published before (resume.py)."""
        resume.publish_at_start(self)

    def collect(self, stop: threading.Event) -> list[Entry]:
        """batch_size fresh rollouts (intake.py); stale, malformed and already-trained ones dropped."""

        def catch_up() -> None:  # the model is the latest published version: late replicas get it
            if self.publisher is not None:
                self.publisher.catch_up(self.version, self.full_model)

        return self.intake.collect(stop, self.lineage, self.version, self.consumed_ids, catch_up)

    def update(self, rollouts: list[Rollout]) -> UpdateStats:
        """One PPO update on a batch (update.py); returns what it saw and did."""
        return update.ppo_update(self, rollouts)

    def step(self, entries: list[Entry]) -> StepRecord | RollbackRecord | None:
        """The seed's steps on one batch: the KL rail, the PPO update, publish, persist when due,
        report. Returns the step's record (a rollback's, when the rail tripped; None: skipped)."""
        rollouts = [rollout for _, rollout in entries]
        if self.section.rollback_on_degenerate and (degenerate := rails.degenerate_version(self)) is not None:
            return rails.roll_back(self, entries, rails.batch_kl(rollouts), degenerate)
        if self.section.kl_hard_limit is not None:
            batch_kl = rails.batch_kl(rollouts)
            if batch_kl > self.section.kl_hard_limit:  # the version that sampled these went too far
                return rails.roll_back(self, entries, batch_kl)
            self.good_versions.update(r.policy_version for r in rollouts)
        if self.distributed is not None:  # no rollback: the other ranks train on the batch too (following.py)
            self.distributed.broadcast_bytes(json.dumps({"roll_back_to": None}).encode())
        if self.publisher is not None:
            self.publisher.transport.prepare()  # e.g. the next publish's file, allocated while the update runs
        started, overflows = time.perf_counter(), self.loss_scale.overflows
        stats = self.update(rollouts)
        update_seconds = time.perf_counter() - started
        if stats.optimizer_steps == 0:  # nothing to publish: the rollouts go to the dropped stream, kept there
            overflows = self.loss_scale.overflows - overflows  # float16's loss scale settling, not NaNs
            reason, detail = (
                ("out_of_memory", "its update ran out of device memory before any optimizer step")
                if stats.out_of_memory
                else ("nonfinite", f"every minibatch of its update was non-finite ({overflows} float16 overflows)")
            )
            for entry_id, _ in entries:
                self.intake.drop(entry_id, reason, detail)
            return None
        version = self.advance_version()
        self.consumed_ids.extend(r.rollout_id for r in rollouts)
        # Publish (critical path), then persist when due (a snapshot here, the writing in the background).
        # The rollouts stay pending in Redis until a committed checkpoint holds them: a crash before
        # that redelivers them, and the resumed trainer trains them once into its lineage.
        self.persister.trained_into_published([entry_id for entry_id, _ in entries])
        if self.sharded:  # the other ranks join the gather in following.follow
            gathering.gather_weights(self)
        publication = self.publish(version)
        due = self.persister.due()
        if self.sharded:  # every rank writes its shards (following.follow joins), then rank 0 persists
            persist_seconds = sharded_persist.persist_together(self, due)
        else:
            persist_seconds = self.persist() if due else 0.0
        seconds = StageSeconds(
            update=update_seconds,
            publish=publication.seconds,
            persist=persist_seconds,
            persist_background=self.persister.last_write_seconds,
            **{k: float(np.mean([r.timings.get(k, 0.0) for r in rollouts])) for k in ROLLOUT_STAGES},
        )
        record = self.step_record(version, rollouts, stats, seconds, publication)
        monitoring.report(self, record, rollouts)
        return record

    def step_record(
        self, version: int, rollouts: list[Rollout], stats: UpdateStats, seconds: StageSeconds, publication: Publication
    ) -> StepRecord:
        """The record of a published update, with the failure detectors' view of it."""
        detectors, firing = monitoring.watch_for_failures(self, stats, rollouts, version)
        return StepRecord(
            version=version,
            time=time.time(),
            rollouts=len(rollouts),
            rollout_versions=sorted({r.policy_version for r in rollouts}),
            reward_model_ids=sorted({r.reward_model_id for r in rollouts}),
            reward_components={
                name: float(np.mean([r.reward_components[name] for r in rollouts if name in r.reward_components]))
                for name in sorted({n for r in rollouts for n in r.reward_components})
            },
            publish_bytes=publication.bytes,
            persisted_version=self.persister.persisted_version,
            stats=stats,
            seconds=seconds,
            sample=Sample(rollouts[0].prompt_text, rollouts[0].response_text, rollouts[0].reward),
            detectors=detectors,
            detectors_firing=firing,
        )

    def advance_version(self) -> int:
        """The next version number, one update further along the lineage."""
        self.version += 1
        self.lineage.advance(self.version)
        return self.version

    def publish(self, version: int) -> Publication:
        """The weights the policy serves, through the weight transport, announced with the count of
        trained rollouts still awaiting their persist (the actor's production bound leaves them out)."""
        if self.publisher is None:  # no queue (the bench's in-process mode): nobody to hand weights to
            return Publication(version, "", "none", 0, 0.0)
        publication = self.publisher.publish(version, self.full_model, self.persister.awaiting(), until_redis_answers)
        self.metrics.record_publication(publication)
        return publication

    def persist(self, wait: bool = False) -> float:
        """Snapshot now, write in the background (wait=True: and wait for it). Returns the seconds on
        this thread: the snapshot's copies, plus waiting for a previous persist still in flight."""
        started = time.perf_counter()
        self.persister.start(resume.snapshot(self, self.version))
        if wait:
            self.persister.wait()
        return time.perf_counter() - started

    def save(self, version: int, consumed: list[str]) -> pathlib.Path:
        """Persist `version` now and wait for it (the bench's in-process mode and tests)."""
        self.version = version
        self.consumed_ids.extend(consumed)
        self.persist(wait=True)
        return pathlib.Path(self.config.run.checkpoint_dir) / f"v{version:06d}"

    def run(self, stop: threading.Event) -> None:
        """Batches until max_steps, `stop` or the end of the actor's data (data.epochs; the last
        rollouts short of a batch are left untrained), then finish(). Under torchrun, rank 0 broadcasts each
        batch to the other ranks, which follow (following.py)."""
        if not self.main_rank:
            return following.follow_rank_zero(self)
        until_redis_answers(self.queue.ensure_group, "creating the consumer group", stop)
        self.publish_at_start()
        steps = 0
        while not stop.is_set():
            try:
                entries = self.collect(stop)
            except REDIS_DOWN as error:  # the partial batch is still pending in Redis: read it again
                log.warning("Redis unavailable while reading rollouts (%s); retrying", error)
                self.intake.restart()
                stop.wait(1.0)
                continue
            if len(entries) < self.section.batch_size:
                break  # stopping or data used up: the partial batch stays pending (read again after a restart)
            if self.distributed is not None:
                self.distributed.broadcast_bytes(encode_rollouts([r for _, r in entries]))
            if self.step(entries) is not None:
                steps += 1
            if self.distributed is not None:
                following.after_distributed_step(self)
            if self.section.max_steps and steps >= self.section.max_steps:
                break
        if self.distributed is not None:
            self.distributed.broadcast_bytes(b"")  # tells the other ranks to stop
        self.finish()

    def finish(self) -> None:
        """At max_steps, SIGTERM or the data's end: persist what is not persisted yet and wait for it; then the
        published copies can go (a restarted policy loads the persisted version)."""
        needed = self.persister.persisted_version != self.version or bool(self.persister.awaiting())
        if self.sharded:  # the other ranks join after their last batch (following.follow)
            sharded_persist.persist_together(self, needed, wait=True)
        elif needed:
            self.persist(wait=True)
        if not needed:
            self.persister.wait()
        if self.publisher is not None:
            self.publisher.close(remove=self.persister.persisted_version == self.version, newest=self.version)
        if self.tensorboard is not None:
            self.tensorboard.close()
