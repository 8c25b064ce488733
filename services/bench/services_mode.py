"""The bench's services mode: the workload on the real stack (redis-server, reference, reward,
policy, trainer as local processes, LocalStack), read back as raw step records from Redis."""

from __future__ import annotations

import pathlib
import re
import shutil

import redis

from ..common.checkpoints import checkpoint_bytes, committed_versions
from ..common.config import BelayConfig
from ..common.rollout_queue import Rollout, RolloutQueue
from ..common.step_records import StepRecord
from ..launcher import follow
from ..local_stack import LocalStack
from .bench_step import BenchStep
from .workload import Workload, belay_config, service_threads

# The trainer's step record's StageSeconds field of each bench stage (bench_step.STAGES).
STAGE_KEYS = {
    "generation": "generate",
    "behaviour_logprobs": "logprobs",
    "reference": "reference",
    "reward": "reward",
    "queue": "queue",
    "update": "update",
    "publish": "publish",
    "persist": "persist",
    "hot_swap": "swap",
}
PERSIST_LOG = re.compile(r"persisted version (\d+) in the background in ([0-9.]+) s")
WIRE_KEYS = ("reference_request_bytes", "reference_reply_bytes", "reward_request_bytes", "reward_reply_bytes")


def background_writes(steps: list[StepRecord], trainer_log: pathlib.Path) -> dict[int, float]:
    """Seconds of each background persist write, by version: from the step records (full precision:
    the last write committed before each step) and from the trainer's log (every write, the final one
    at shutdown included, to 10 ms)."""
    writes = {}
    if trainer_log.is_file():
        for version, seconds in PERSIST_LOG.findall(trainer_log.read_text(errors="replace")):
            writes[int(version)] = float(seconds)
    for step in steps:
        if step.persisted_version and step.seconds.persist_background:
            writes[step.persisted_version] = step.seconds.persist_background
    return writes


def bench_step(step: StepRecord) -> BenchStep:
    """The bench's record of a trainer step, from the record the trainer wrote to the steps stream."""
    return BenchStep(
        version=step.version,
        end_time=step.time,
        rollouts=step.rollouts,
        response_tokens=round(step.stats.response_length_mean * step.rollouts),
        rollout_versions=step.rollout_versions,
        optimizer_steps=step.stats.optimizer_steps,
        publish_bytes=step.publish_bytes,
        persisted_version=step.persisted_version,
        persist_background_seconds=step.seconds.persist_background,
        seconds={stage: getattr(step.seconds, key) for stage, key in STAGE_KEYS.items()},
    )


def run_services(
    workload: Workload,
    run_dir: pathlib.Path,
    max_staleness: int,
    advantage: str,
    startup_timeout: float = 900.0,
    say=print,
) -> dict:
    """warmup + iterations trainer steps on a fresh stack. Returns the raw run: one record per step
    (end time, rollouts, response tokens, seconds per stage), the measured window's start, peak
    memory per process, and bytes per rollout on each path."""
    config = belay_config(workload, run_dir, max_staleness, advantage)
    steps, peaks, entries, dropped = run_stack(
        config, run_dir, workload.warmup + workload.iterations, startup_timeout, say
    )
    rollouts = [Rollout.from_fields(fields) for fields in entries]
    if not all(isinstance(step, StepRecord) for step in steps):
        raise RuntimeError("a bench step was a KL rollback, not an update: the figures would mix the two")
    records = [bench_step(step) for step in steps]
    # The window starts where the last warm-up step ended; with no warm-up, where the first batch began.
    start = records[workload.warmup - 1].end_time if workload.warmup else min(r.timings["started_at"] for r in rollouts)
    every = workload.checkpoint_every_steps
    return {
        "steps": [record.to_dict() for record in records],
        "measured_from": start,
        "warmup": workload.warmup,
        "peak_memory_bytes": {
            name: peaks[name] for name in ("policy", "reference", "reward", "trainer", "redis") if name in peaks
        },
        "bytes": bytes_moved(workload, config, records[workload.warmup :], rollouts, entries),
        "persist_writes_seconds": {
            str(v): sec for v, sec in sorted(background_writes(steps, run_dir / "logs" / "trainer.log").items())
        },
        "checkpoint_every_steps": every,
        "weight_transport": config.trainer.weight_transport,
        "rollouts_written": len(rollouts),
        "rollouts_dropped": {r: dropped.count(r) for r in sorted(set(dropped))},
        "hot_swap_per_step": True,
        "settings": {
            "max_staleness": max_staleness,
            "advantage": advantage,
            "processes": "redis + 4 services",
            "torch_threads": service_threads(workload.torch_threads, max_staleness),
        },
    }


def run_stack(
    config: BelayConfig, run_dir: pathlib.Path, steps_wanted: int, startup_timeout: float, say=print
) -> tuple[list[dict], dict[str, int], list[dict], list[str]]:
    """Start the stack afresh in run_dir, follow `steps_wanted` trainer steps, read what Redis holds, stop the stack.
    Returns (the trainer's steps, peak memory per process, the rollout stream's entries, drop reasons)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    stack = LocalStack(config, run_dir, say=lambda *_: None)
    try:
        stack.start()
        stack.wait_healthy(startup_timeout)
        steps = follow(config, stack, steps_wanted, say=lambda line: say("    " + line))
        peaks = stack.peak_memory_bytes()  # before stop(): the processes must still be there
        client = redis.Redis.from_url(config.redis.url)
        queue = RolloutQueue(client, config.run.name)
        entries = [fields for _, fields in client.xrange(queue.stream)]  # the actor may still be adding some
        dropped = [fields[b"drop_reason"].decode() for _, fields in client.xrange(queue.dropped_stream)]
    finally:
        stack.stop()
    return steps, peaks, entries, dropped


def bytes_moved(
    workload: Workload, config: BelayConfig, measured: list[BenchStep], rollouts: list[Rollout], entries: list[dict]
) -> dict[str, float]:
    """Bytes on each path: per rollout on the wire and in the stream, per update published (what the
    policy maps), per persist and per update persisted (the final persist's checkpoint, at shutdown)."""
    rows, every = workload.batch_size, workload.checkpoint_every_steps
    persist_bytes = checkpoint_bytes(committed_versions(config.run.checkpoint_dir)[-1][1])
    publish_bytes = sum(step.publish_bytes for step in measured) / len(measured)
    wire = {f"{key}_per_rollout": sum(r.timings[key] for r in rollouts) / rows / len(rollouts) for key in WIRE_KEYS}
    entry_bytes = [sum(len(name) + len(value) for name, value in fields.items()) for fields in entries]
    return {
        **wire,
        "stream_entry_bytes_per_rollout": sum(entry_bytes) / len(entry_bytes),
        "publish_bytes_per_update": publish_bytes,
        "publish_bytes_per_rollout": publish_bytes / rows,
        "checkpoint_bytes_per_persist": persist_bytes,
        "persist_bytes_per_update": persist_bytes / every,
        "persist_bytes_per_rollout": persist_bytes / every / rows,
        "hot_swap_read_bytes_per_update": publish_bytes,
    }
