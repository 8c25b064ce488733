"""The bench's in-process mode on the tiny models: its raw run crosses JSON as the bench reads it back,
every raw step is a BenchStep (versions in order, every stage timed), and its figures come out."""

import json

import torch

from services.bench.bench_step import STAGES, BenchStep
from services.bench.figures import mode_figures
from services.bench.in_process import run_in_process
from services.bench.workload import Workload
from services.common.strict_json import strict_json


def test_in_process_run_gives_bench_steps_and_figures(tiny_lm_dir, tiny_reward_dir, tmp_path):
    workload = Workload(
        model_dir=str(tiny_lm_dir),
        reward_dir=str(tiny_reward_dir),
        iterations=1,
        warmup=1,
        max_new_tokens=4,
        prompts_per_batch=4,
        minibatch_size=2,
        # the pytest process's own count: run_in_process sets it, and a changed count would change the
        # numerics of every later test in this process (test_failure_detectors' provocations among them)
        torch_threads=torch.get_num_threads(),
    )
    run = json.loads(strict_json(run_in_process(workload, tmp_path / "run")))
    steps = [BenchStep.from_dict(step) for step in run["steps"]]
    assert [s.version for s in steps] == [1, 2] and all(s.rollouts == 4 and s.optimizer_steps > 0 for s in steps)
    assert all(set(s.seconds) == set(STAGES) and s.seconds["update"] > 0 for s in steps)
    assert run["measured_from"] == steps[0].end_time  # the window starts where the warm-up step ended
    figures = mode_figures(run)
    assert figures["steps_measured"] == 1 and figures["rollouts_measured"] == 4
    assert figures["seconds_per_step"] == steps[1].end_time - steps[0].end_time
