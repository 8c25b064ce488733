"""`belay bench`: the fixed workload as services (overlap off, overlap on, overlap on with GAE),
in one process, and in TRL; per-stage figures, throughput, memory and bytes, the weight hand-off
(publish every update, persist every checkpoint_every_steps: seconds on and off the trainer's
critical path, bytes per transport, measured GB/s) and its projection to larger models, then the
comparisons with the targets. Figures come from the steps after `warmup`; every raw step is kept.
This module runs the modes; figures.py computes the figures and report.py writes them for a person."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import torch

from .figures import GB, SERVICE_MODES, comparisons, mode_figures, projection, repeated, transports
from .services_mode import run_services
from .workload import Workload

BROADCAST_PROBE_BYTES = 256 * 2**20


def run_in_process_subprocess(workload: Workload, run_dir: pathlib.Path) -> dict:
    """The in-process mode in a fresh interpreter, so its peak memory is its own."""
    with tempfile.TemporaryDirectory(prefix="belay-bench-") as temp:
        spec, out = pathlib.Path(temp) / "workload.json", pathlib.Path(temp) / "run.json"
        spec.write_text(json.dumps(dataclasses.asdict(workload)))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.bench.in_process",
                "--workload",
                str(spec),
                "--run-dir",
                str(run_dir),
                "--json",
                str(out),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the in-process mode failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def run_trl_subprocess(workload: Workload, python: str) -> dict:
    """services/bench/trl_baseline.py in its own interpreter (its own environment if TRL's pins need one)."""
    with tempfile.TemporaryDirectory(prefix="belay-bench-trl-") as temp:
        out = pathlib.Path(temp) / "trl.json"
        command = [
            python,
            "-m",
            "services.bench.trl_baseline",
            "--json",
            str(out),
            "--model-dir",
            workload.model_dir,
            "--reward-dir",
            workload.reward_dir,
            "--prompts-file",
            workload.prompts_file,
            "--iterations",
            str(workload.iterations),
            "--warmup",
            str(workload.warmup),
            "--max-new-tokens",
            str(workload.max_new_tokens),
            "--batch",
            str(workload.prompts_per_batch),
            "--minibatch-size",
            str(workload.minibatch_size),
            "--torch-threads",
            str(workload.torch_threads),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the TRL baseline failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def measure_broadcast(nbytes: int = BROADCAST_PROBE_BYTES, timeout: float = 300.0) -> dict:
    """services.bench.weight_broadcast.measure_broadcast_gbps(nbytes) in its own interpreter (its
    gloo groups and store stay out of the bench's process). Returns {"bytes_per_second", "status"}."""
    probe = (
        "import json, sys\n"
        "from services.bench.weight_broadcast import measure_broadcast_gbps\n"
        "print(json.dumps({'gbps': float(measure_broadcast_gbps(int(sys.argv[1])))}))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe, str(nbytes)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=pathlib.Path(__file__).resolve().parents[2],
        )
    except subprocess.TimeoutExpired:
        return {"bytes_per_second": None, "status": f"not measured (no answer in {timeout:.0f} s)"}
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"bytes_per_second": None, "status": f"not measured (the probe failed: {tail[:200]})"}
    return {
        "bytes_per_second": answer["gbps"] * GB,
        "status": f"measured by services.bench.weight_broadcast.measure_broadcast_gbps({nbytes}), loopback gloo",
    }


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": list(os.getloadavg()),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "time": time.time(),
    }


def run_bench(
    workload: Workload, run_dir: pathlib.Path, trl: bool, trl_python: str = sys.executable, repeat: int = 1, say=print
) -> dict:
    """Every mode once; the overlap-off services mode and the in-process mode `repeat` times each
    (alternating, so a change in the machine's load reaches both), judged on their medians."""
    results: dict = {"machine": machine(), "workload": dataclasses.asdict(workload)}
    for key, title, max_staleness, advantage in SERVICE_MODES:
        say(f"{title} ...")
        results[key] = mode_figures(run_services(workload, run_dir / key, max_staleness, advantage, say=say))
    say("in one process (no RPC, no queue) ...")
    results["in_process"] = mode_figures(run_in_process_subprocess(workload, run_dir / "in_process"))
    again: dict[str, list[dict]] = {"services_overlap_off": [], "in_process": []}
    for run in range(2, repeat + 1):
        say(f"repeat {run}/{repeat}: services, overlap off ...")
        again["services_overlap_off"].append(
            mode_figures(run_services(workload, run_dir / f"services_overlap_off_{run}", 0, "batch_mean", say=say))
        )
        say(f"repeat {run}/{repeat}: in one process ...")
        again["in_process"].append(mode_figures(run_in_process_subprocess(workload, run_dir / f"in_process_{run}")))
    for key, runs in again.items():
        results[key] = repeated(results[key], runs)
    if trl:
        say("TRL PPOTrainer ...")
        results["trl"] = run_trl_subprocess(workload, trl_python)
    say("broadcast transport bandwidth ...")
    results["transports"] = transports(results, measure_broadcast())
    results["projection"] = projection(results["transports"], workload.checkpoint_every_steps)
    results["comparisons"] = comparisons(results)
    return results
