"""The rollout loop: prompt rows -> sampled responses -> reference logprobs and reward (concurrently)
-> one Rollout per response on the Redis stream, with the data position in the same transaction.
New weights are taken only between batches; once the data is used up (data.epochs) the loop only
serves and swaps (prompt_stream.py)."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid

import grpc
import numpy as np

from belay.v1 import belay_pb2, belay_pb2_grpc

from ..common.config import BelayConfig
from ..common.packing import PackingError, pack_int32, unpack_float32, unpack_int32
from ..common.prompt_data import PromptData, PromptRow, load_prompt_data
from ..common.prompts import read_prompts
from ..common.review_store import ReviewStore
from ..common.rollout_queue import REDIS_DOWN, Rollout, RolloutQueue, consumer_name
from ..common.row_metadata import metadata_to_json
from .canaries import Bounds, Canaries
from .engine import GenerationBatch, PolicyEngine, Sampling, templated_length
from .heldout_eval import HeldOutEval
from .policy_metrics import PolicyMetrics
from .prompt_stream import PromptStream
from .swaps import SwapRequests, checked_weights_path

log = logging.getLogger(__name__)


class DependencyError(RuntimeError):
    """A reference or reward call that failed, or answered something unusable: the batch is
    abandoned (nothing written), reported, and the actor retries with back-off."""

    def __init__(self, dependency: str, what: str):
        super().__init__(f"{dependency} failed: {what}")
        self.dependency = dependency

    @classmethod
    def from_rpc(cls, dependency: str, error: grpc.RpcError) -> DependencyError:
        return cls(dependency, f"{error.code().name}: {error.details()}")


def reference_request(batch: GenerationBatch, temperature: float, top_k: int) -> belay_pb2.LogProbsRequest:
    return belay_pb2.LogProbsRequest(
        prompt_ids=pack_int32(batch.prompt_ids),
        response_ids=pack_int32(batch.response_ids),
        temperature=temperature,
        top_k=top_k,
    )


def score_request(batch: GenerationBatch, prompts: list[PromptRow]) -> belay_pb2.ScoreRequest:
    """Each response with its prompt row's text (a messages row's last user turn) and metadata."""
    rows = [prompts[i] for i in batch.prompt_index]
    return belay_pb2.ScoreRequest(
        prompts=[row.text for row in rows],
        responses=batch.texts,
        metadata_json=metadata_to_json([row.metadata for row in rows]),
    )


def build_rollouts(
    batch: GenerationBatch,
    prompts: list[PromptRow],
    ref: list[tuple],
    rewards: list[float],
    components: list[dict],
    reward_model_id: str,
    timings: dict,
    samples_per_prompt: int,
) -> list[Rollout]:
    """One Rollout per generated row: the sample, its reference rows (logprobs, top ids, top
    logprobs), its score. The actor and the bench's in-process mode both build rollouts here."""
    groups = [uuid.uuid4().hex for _ in prompts]
    rollouts = []
    for row in range(len(batch.response_ids)):
        ref_logprobs, ref_top_ids, ref_top_logprobs = ref[row]
        extra = {} if ref_top_ids is None else {"ref_top_ids": ref_top_ids, "ref_top_logprobs": ref_top_logprobs}
        rollouts.append(
            Rollout(
                prompt_text=prompts[batch.prompt_index[row]].text,
                response_text=batch.texts[row],
                prompt_ids=np.asarray(batch.prompt_ids[row], np.int32),
                response_ids=np.asarray(batch.response_ids[row], np.int32),
                logprobs=np.asarray(batch.logprobs[row], np.float32),
                ref_logprobs=np.asarray(ref_logprobs, np.float32),
                reward=rewards[row],
                policy_version=batch.version,
                finish_reason=batch.finish_reasons[row],
                group_id=groups[batch.prompt_index[row]],
                group_size=samples_per_prompt,
                reward_model_id=reward_model_id,
                reward_components=components[row],
                timings=timings,
                metadata=prompts[batch.prompt_index[row]].metadata,
                **extra,
            )
        )
    return rollouts


def may_generate(
    trainer_version: int, outstanding_rollouts: int, policy_version: int, rows: int, batch_size: int, max_staleness: int
) -> bool:
    """Whether a batch sampled now would be fresh enough for the trainer: its last row is trained at
    version trainer_version + (outstanding + rows - 1) // batch_size (each trainer batch adds one),
    and is dropped as stale past policy_version + max_staleness. So max_staleness 0 generates only
    once the trainer has taken everything and published (overlap off); 1 samples batch k+1 while the
    trainer updates on batch k (overlap on). Drops only lower the trainer's version: no deadlock."""
    trained_at = trainer_version + (outstanding_rollouts + rows - 1) // batch_size
    return trained_at - policy_version <= max_staleness


class Actor:
    def __init__(
        self,
        config: BelayConfig,
        engine: PolicyEngine,
        queue: RolloutQueue,
        reference: belay_pb2_grpc.ReferenceStub,
        reward: belay_pb2_grpc.RewardStub,
        swaps: SwapRequests,
        metrics: PolicyMetrics,
        data: PromptData | None = None,
    ):
        self.config, self.engine, self.queue = config, engine, queue
        self.reference, self.reward = reference, reward
        self.swaps, self.metrics = swaps, metrics
        # The data, checked at start (DataError names the file and column); rows over the prompt limit
        # skipped and counted; the walk resumed from the position the last pushed batch saved.
        self.data = data if data is not None else load_prompt_data(config, templated_length(engine.tokenizer))
        self.prompts = PromptStream.from_data(self.data, config)
        self.prompts.resume(queue.data_position())
        metrics.observe_data(self.data, self.prompts.position)
        self.last_swap_seconds = 0.0
        trainer = config.trainer  # the exact KL needs the reference's top-k rows in each rollout
        self.reference_top_k = (trainer.kl_top_k or engine.vocab_size) if trainer.kl_estimator == "full" else 0
        self.refused_version = 0  # a checkpoint that failed to load is not retried every batch
        self.replica = consumer_name()
        self.reported, self.reported_at = -1, 0.0
        self.batches = 0
        self.said_finished = False
        canary_file = config.policy.canary_prompts_file
        self.canaries = (
            Canaries(
                read_prompts(canary_file, "policy.canary_prompts_file"),
                config.policy.canary_max_new_tokens,
                ReviewStore(queue.redis, config.run.name),
                metrics.registry,
                Bounds(
                    config.policy.canary_repetition_bound,
                    config.policy.canary_relevance_drop_bound,
                    config.policy.canary_relevance_floor,
                ),
                config.policy.canary_embedding_model_dir,
            )
            if canary_file
            else None
        )
        self.heldout = (
            HeldOutEval(config, self.data.heldout, ReviewStore(queue.redis, config.run.name), metrics.registry)
            if config.trainer.eval_every
            else None
        )

    def take_new_weights(self) -> None:
        """Swap to the newest version announced (Redis key, the truth) or requested (RPC, or staged
        by a receiving transport), then say in Redis what this replica serves."""
        version, path = self.queue.latest_version()
        if version > self.engine.version and path and version != self.refused_version:
            try:
                self.swaps.offer(version, checked_weights_path(self.config.run, version, path))
            except Exception as error:
                self.refused_version = version  # said once: the next version is the way on
                log.error("announced version %d refused: %s", version, error)
        version, path = self.swaps.newest()
        if version > self.engine.version and version != self.refused_version:
            try:
                self.last_swap_seconds = self.engine.swap_to(version, path)
            except (ValueError, FileNotFoundError) as error:  # the old weights keep serving
                self.refused_version = version
                self.metrics.batch_failures.labels(reason="swap").inc()
                log.error("version %d refused, still serving %d: %s", version, self.engine.version, error)
                return
            self.metrics.record_swap(self.last_swap_seconds, version)
        self.report_serving()

    def report_serving(self) -> None:
        """The trainer keeps published weights until no live replica serves older ones."""
        now = time.monotonic()
        if self.reported != self.engine.version or now - self.reported_at > 10:
            policy = self.config.policy
            self.queue.report_serving(
                self.replica,
                self.engine.version,
                policy.advertise_address or policy.address,
                self.config.trainer.weight_transport,
            )
            self.reported, self.reported_at = self.engine.version, now

    def answer_canaries(self) -> None:
        """The fixed prompts, greedily, once per version served (the first call: the starting version)."""
        if self.canaries is not None:
            self.canaries.answer(self.engine)

    def evaluate_heldout(self) -> None:
        """The held-out rows, every trainer.eval_every versions (services/policy/heldout_eval.py)."""
        if self.heldout is not None:
            self.heldout.run(self)

    def score(
        self, batch: GenerationBatch, prompts: list[PromptRow]
    ) -> tuple[list[tuple], list[float], list[dict[str, float]], str, dict[str, float]]:
        """Reference logprobs and rewards for a batch, both calls in flight at once.

        Returns (ref, rewards, components, reward_model_id, timings): ref holds a (logprobs, top_ids,
        top_logprobs) triple per response, the top-k parts None without reference top-k; components
        one {name: score} per response; timings each call's seconds and its message sizes in bytes."""
        section = self.config.policy
        ref_request = reference_request(batch, section.temperature, self.reference_top_k)
        reward_request = score_request(batch, prompts)
        start = time.perf_counter()
        ref_call = self.reference.LogProbs.future(ref_request, timeout=section.reference_timeout_seconds)
        reward_call = self.reward.Score.future(reward_request, timeout=section.reward_timeout_seconds)
        timings = {}
        try:
            reward_reply = reward_call.result()
            timings["reward"] = time.perf_counter() - start
        except grpc.RpcError as error:
            ref_call.cancel()
            raise DependencyError.from_rpc("reward", error) from None
        try:
            ref_reply = ref_call.result()
            timings["reference"] = time.perf_counter() - start
        except grpc.RpcError as error:
            raise DependencyError.from_rpc("reference", error) from None
        for name, seconds in timings.items():
            self.metrics.dependency_seconds.labels(dependency=name).observe(seconds)
        timings.update(
            reference_request_bytes=ref_request.ByteSize(),
            reference_reply_bytes=ref_reply.ByteSize(),
            reward_request_bytes=reward_request.ByteSize(),
            reward_reply_bytes=reward_reply.ByteSize(),
        )
        try:
            ref_logprobs = unpack_float32(ref_reply.logprobs, "reference logprobs")
        except PackingError as error:
            raise DependencyError("reference", str(error)) from None
        if [len(r) for r in ref_logprobs] != [len(r) for r in batch.response_ids]:
            raise DependencyError("reference", "logprob rows do not match the responses' lengths")
        if not all(np.isfinite(r).all() for r in ref_logprobs):
            raise DependencyError("reference", "non-finite logprobs")
        top_ids = unpack_int32(ref_reply.top_ids, "reference top ids") if self.reference_top_k else []
        top_logprobs = unpack_float32(ref_reply.top_logprobs, "reference top logprobs") if self.reference_top_k else []
        ref = [
            (lp, top_ids[i] if top_ids else None, top_logprobs[i] if top_logprobs else None)
            for i, lp in enumerate(ref_logprobs)
        ]
        if len(reward_reply.scores) != len(batch.texts):
            raise DependencyError("reward", f"{len(reward_reply.scores)} scores for {len(batch.texts)} responses")
        if not all(math.isfinite(score) for score in reward_reply.scores):
            raise DependencyError("reward", f"non-finite scores {list(reward_reply.scores)[:8]}")
        components = [
            {part.name: float(part.scores[row]) for part in reward_reply.components} for row in range(len(batch.texts))
        ]
        if any(len(part.scores) != len(batch.texts) for part in reward_reply.components):
            raise DependencyError("reward", "a component's score count does not match the responses")
        return ref, list(reward_reply.scores), components, reward_reply.reward_model_id, timings

    def run_batch(self) -> int:
        """Generate, score and enqueue one batch, and move the data position past its rows in the same
        transaction. Returns the number of rollouts written (0: the data is used up)."""
        section = self.config.policy
        started_at = time.time()
        prompts, after = self.prompts.peek(section.prompts_per_batch)
        if not prompts:
            self.prompts.advance(after)
            return 0
        sampling = Sampling(
            temperature=section.temperature,
            top_p=section.top_p,
            max_new_tokens=section.max_new_tokens,
            seed=section.seed + self.batches,
        )
        self.batches += 1
        batch = self.engine.generate([row.chat for row in prompts], section.samples_per_prompt, sampling)
        self.metrics.observe_generation(batch)
        ref, rewards, components, reward_model_id, timings = self.score(batch, prompts)
        # Seconds per stage, the batch's wire bytes and wall-clock marks (the trainer adds the queue time).
        timings.update(
            generate=batch.generate_seconds,
            logprobs=batch.logprob_seconds,
            swap=self.last_swap_seconds,
            started_at=started_at,
        )
        self.last_swap_seconds = 0.0  # the swap is paid by the first batch after it
        rollouts = build_rollouts(
            batch, prompts, ref, rewards, components, reward_model_id, timings, section.samples_per_prompt
        )
        timings["enqueued_at"] = time.time()  # the dict every rollout shares, serialised by add_all
        self.queue.add_all(rollouts, after.to_record())
        self.prompts.advance(after)  # only once the batch is in the stream: a failed batch takes its rows again
        self.metrics.observe_data(self.data, after)
        self.metrics.rollouts_written.inc(len(batch.response_ids))
        log.info(
            "version %d: wrote %d rollouts (generate %.1f s, reference %.1f s, reward %.1f s)",
            batch.version,
            len(batch.response_ids),
            batch.seconds,
            timings.get("reference", 0),
            timings.get("reward", 0),
        )
        return len(batch.response_ids)

    def fresh_enough(self) -> bool:
        """may_generate() on the queue's state: outstanding rollouts are those not trained yet, the
        unread and the pending ones less those trained but awaiting their persist (pending until
        then). Read before the version, since the trainer publishes before it acknowledges."""
        outstanding = max(0, self.queue.waiting() + self.queue.pending_count() - self.queue.awaiting_persist())
        trainer_version, _ = self.queue.latest_version()
        section = self.config.policy
        return may_generate(
            trainer_version,
            outstanding,
            self.engine.version,
            section.prompts_per_batch * section.samples_per_prompt,
            self.config.trainer.batch_size,
            self.config.trainer.max_staleness,
        )

    def say_finished(self) -> None:
        if not self.said_finished:
            self.said_finished = True
            log.info(
                "the data is used up (%d epochs of %d rows from %s): no more rollouts; the trainer finishes "
                "what is queued and exits",
                self.config.data.epochs,
                len(self.data.train),
                self.data.source,
            )

    def run(self, stop: threading.Event) -> None:
        poll = self.config.policy.version_poll_seconds
        failures = 0
        while not stop.is_set():
            try:
                self.take_new_weights()
                self.answer_canaries()
                self.evaluate_heldout()
                if self.prompts.finished:  # used up: keep serving and swapping, produce nothing more
                    self.say_finished()
                    stop.wait(poll)
                    continue
                if self.queue.waiting() >= self.config.redis.max_queue_lag:  # back-pressure: trainer is behind
                    stop.wait(poll)
                    self.metrics.backpressure_seconds.inc(poll)
                    continue
                if not self.fresh_enough():  # its rows would be dropped as stale: wait for the trainer
                    stop.wait(poll)
                    continue
                self.run_batch()
                failures = 0
            except REDIS_DOWN as error:
                failures += 1
                self.metrics.batch_failures.labels(reason="redis").inc()
                log.warning(
                    "Redis unavailable (%s); the batch in hand is not written; retrying in %d s",
                    error,
                    min(30, 2**failures),
                )
                stop.wait(min(30, 2**failures))
            except DependencyError as error:
                failures += 1
                self.metrics.batch_failures.labels(reason=error.dependency).inc()
                log.warning("batch abandoned (nothing written): %s; retrying in %d s", error, min(30, 2**failures))
                stop.wait(min(30, 2**failures))
