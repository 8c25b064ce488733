"""`belay bench` end to end on tiny real models (real processes, real Redis, real gRPC), and the
actor's staleness bound that makes overlap off waste nothing."""
from __future__ import annotations

import json
import math

import redis

from services.cli import main
from services.common.rollout_queue import RolloutQueue
from services.launcher import LocalStack, follow
from tests.system.conftest import account_for_rollouts, variant

MODES = ("services_overlap_off", "services_overlap_on", "services_overlap_on_gae", "in_process")
STAGES = ("generation", "behaviour_logprobs", "reference", "reward", "queue", "update", "checkpoint_write", "hot_swap")
SERVICES = ("policy", "reference", "reward", "trainer", "redis")
WIRE = ("reference_request", "reference_reply", "reward_request", "reward_reply", "stream_entry", "checkpoint")


def test_bench_writes_every_figure_of_every_mode(tiny_lm_dir, tiny_reward_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model-dir", str(tiny_lm_dir), "--reward-dir", str(tiny_reward_dir), "--iterations", "1",
                 "--warmup", "0", "--no-trl", "--json", str(out), "--run-dir", str(tmp_path / "runs")])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results) == {"machine", "workload", *MODES, "comparisons"}

    for mode in MODES:
        figures = results[mode]
        assert "[" + mode + "]" in printed
        for stage in STAGES:
            assert figures[f"{stage}_seconds"] >= 0
        assert math.isclose(sum(figures[f"{stage}_share"] for stage in STAGES), 1.0, abs_tol=1e-6)
        for stage in STAGES:  # each share is its stage's part of the summed stage time
            assert math.isclose(figures[f"{stage}_share"], figures[f"{stage}_seconds"] / figures["stage_seconds_sum"],
                                rel_tol=1e-9)
        assert figures["generation_seconds"] > 0 and figures["update_seconds"] > 0
        # Throughput from the raw step records: rollouts over the measured window's wall time.
        steps = figures["steps"]
        assert len(steps) == 1 and figures["steps_measured"] == 1
        wall = steps[-1]["end_time"] - figures["measured_from"]
        assert wall > 0
        assert math.isclose(figures["samples_per_second"], sum(s["rollouts"] for s in steps) / wall, rel_tol=1e-9)
        assert math.isclose(figures["tokens_per_second"], sum(s["response_tokens"] for s in steps) / wall, rel_tol=1e-9)
        assert steps[0]["rollouts"] == results["workload"]["prompts_per_batch"]
        assert figures["checkpoint_per_step"] is True

    for mode in MODES[:3]:
        figures = results[mode]
        for name in SERVICES:
            assert figures[f"peak_memory_bytes_{name}"] > 0
        for name in WIRE:
            assert figures[f"{name}_bytes_per_rollout"] > 0
        assert figures["checkpoint_bytes_per_update"] == figures["checkpoint_bytes_per_rollout"] * 8
        assert figures["bytes_moved_per_rollout"] > figures["checkpoint_bytes_per_rollout"]
        assert figures["hot_swap_per_step"] is True
        assert figures["rollouts_dropped"] == {}  # the staleness bound: nothing sampled in vain
    assert results["services_overlap_off"]["settings"]["max_staleness"] == 0
    assert results["services_overlap_on_gae"]["settings"]["advantage"] == "gae"
    assert results["in_process"]["peak_memory_bytes_in_process"] > 0
    assert results["in_process"]["hot_swap_per_step"] is False and results["in_process"]["hot_swap_seconds"] == 0

    comparisons = results["comparisons"]
    off, on, alone = (results[m]["samples_per_second"] for m in MODES[:2] + ("in_process",))
    assert math.isclose(comparisons["services_over_in_process_samples_per_second"], off / alone, rel_tol=1e-9)
    assert math.isclose(comparisons["overlap_on_over_overlap_off_samples_per_second"], on / off, rel_tol=1e-9)
    verdict = comparisons["target_services_at_most_10_percent_slower_than_in_process"]
    assert verdict == ("MET" if comparisons["services_over_in_process_seconds_per_step"] <= 1.10 else "MISSED")
    assert f"): {verdict}" in printed


def test_overlap_off_trains_every_batch_on_the_version_that_sampled_it(stack_config, tmp_path):
    """max_staleness 0: the actor samples batch k+1 only with the version the trainer published
    from batch k, so no rollout is dropped as stale and each batch is trained at its own version."""
    config = variant(stack_config, {"trainer": {"max_staleness": 0, "max_steps": 3},
                                    "policy": {"canary_prompts_file": "", "version_poll_seconds": 0.05}})
    stack = LocalStack(config, tmp_path / "run", say=lambda *_: None)
    try:
        stack.start()
        stack.wait_healthy(180)
        steps = follow(config, stack, iterations=3, say=lambda *_: None)
        client = redis.Redis.from_url(config.redis.url)
        dropped = client.xrange(RolloutQueue(client, config.run.name).dropped_stream)
        accounted = account_for_rollouts(config)
    finally:
        stack.stop()
    assert [s["version"] for s in steps] == [1, 2, 3]
    for step in steps:  # trained at version - 1 on rollouts of exactly that version
        assert step["rollout_versions"] == [step["version"] - 1]
    assert dropped == []
    # The trainer stops after 3 updates; the actor can sample one more batch (on version 3), no more.
    assert accounted["trained"] == 24 and accounted["written"] <= 32
