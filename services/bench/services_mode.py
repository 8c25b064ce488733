"""The bench's services mode: the workload on the real stack (redis-server, reference, reward,
policy, trainer as local processes, LocalStack), read back as raw step records from Redis."""
from __future__ import annotations

import pathlib
import shutil

import redis

from ..common.checkpoints import committed_versions
from ..common.rollout_queue import Rollout, RolloutQueue
from ..launcher import LocalStack, follow
from .workload import Workload, belay_config, service_threads

# The trainer's step summary "seconds" key of each bench stage.
STAGE_KEYS = {"generation": "generate", "behaviour_logprobs": "logprobs", "reference": "reference",
              "reward": "reward", "queue": "queue", "update": "update", "checkpoint_write": "checkpoint",
              "hot_swap": "swap"}
WIRE_KEYS = ("reference_request_bytes", "reference_reply_bytes", "reward_request_bytes", "reward_reply_bytes")


def directory_bytes(path: pathlib.Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def run_services(workload: Workload, run_dir: pathlib.Path, max_staleness: int, advantage: str,
                 startup_timeout: float = 900.0, say=print) -> dict:
    """warmup + iterations trainer steps on a fresh stack. Returns the raw run: one record per step
    (end time, rollouts, response tokens, seconds per stage), the measured window's start, peak
    memory per process, and bytes per rollout on each path."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = belay_config(workload, run_dir, max_staleness, advantage)
    stack = LocalStack(config, run_dir, say=lambda *_: None)
    steps_wanted = workload.warmup + workload.iterations
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
    rollouts = [Rollout.from_fields(fields) for fields in entries]
    if any("event" in step for step in steps):
        raise RuntimeError("a bench step was a KL rollback, not an update: the figures would mix the two")
    rows = workload.batch_size
    records = [{"version": s["version"], "end_time": s["time"], "rollouts": s["rollouts"],
                "response_tokens": round(s["response_length_mean"] * s["rollouts"]),
                "rollout_versions": s["rollout_versions"],
                "seconds": {stage: float(s["seconds"].get(key, 0.0)) for stage, key in STAGE_KEYS.items()}}
               for s in steps]
    # The window starts where the last warm-up step ended; with no warm-up, where the first batch began.
    start = records[workload.warmup - 1]["end_time"] if workload.warmup else min(
        r.timings["started_at"] for r in rollouts)
    latest = committed_versions(config.run.checkpoint_dir)[-1][1]
    checkpoint_bytes = directory_bytes(latest)
    weights_bytes = sum(f.stat().st_size for f in latest.glob("*.safetensors") if f.name != "trainer_state.safetensors")
    wire = {f"{key}_per_rollout": sum(r.timings[key] for r in rollouts) / rows / len(rollouts) for key in WIRE_KEYS}
    entry_bytes = [sum(len(name) + len(value) for name, value in fields.items()) for fields in entries]
    return {
        "steps": records, "measured_from": start, "warmup": workload.warmup,
        "peak_memory_bytes": {name: peaks[name] for name in ("policy", "reference", "reward", "trainer", "redis")
                              if name in peaks},
        "bytes": {**wire, "stream_entry_bytes_per_rollout": sum(entry_bytes) / len(entry_bytes),
                  "checkpoint_bytes_per_update": checkpoint_bytes, "checkpoint_bytes_per_rollout": checkpoint_bytes / rows,
                  "hot_swap_read_bytes_per_update": weights_bytes, "hot_swap_read_bytes_per_rollout": weights_bytes / rows},
        "rollouts_written": len(rollouts), "rollouts_dropped": {r: dropped.count(r) for r in sorted(set(dropped))},
        "checkpoint_per_step": True, "hot_swap_per_step": True,
        "settings": {"max_staleness": max_staleness, "advantage": advantage, "processes": "redis + 4 services",
                     "torch_threads": service_threads(workload.torch_threads, max_staleness)},
    }
