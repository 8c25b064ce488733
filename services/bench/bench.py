"""`belay bench`: the fixed workload as services (overlap off, overlap on, overlap on with GAE),
in one process, and in TRL; per-stage figures, throughput, memory and bytes, then the comparisons
with issue #7's targets. Figures come from the steps after `warmup`; every raw step is kept."""
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

from .services_mode import STAGE_KEYS, run_services
from .workload import Workload

STAGES = tuple(STAGE_KEYS)
# (JSON key, title, trainer.max_staleness, trainer.advantage) of each run of the real stack
SERVICE_MODES = (("services_overlap_off", "services, overlap off (max_staleness 0), seed recipe (batch_mean)", 0,
                  "batch_mean"),
                 ("services_overlap_on", "services, overlap on (max_staleness 1), seed recipe (batch_mean)", 1,
                  "batch_mean"),
                 ("services_overlap_on_gae", "services, overlap on (max_staleness 1), GAE with a value head on "
                  "the policy's trunk (TRL's estimator)", 1, "gae"))
SERVICES_SLOWDOWN_TARGET = 1.10   # services' seconds per step at most 10% above in-process (overlap off)
TRL_SPEEDUP_TARGET = 1.5          # at least 1.5x TRL's samples per second


def mode_figures(run: dict) -> dict:
    """One flat dict per mode (seconds and bytes in base units) from its raw run. The shares are of
    the summed stage time: stages can overlap (reference with reward; generation with the update
    when overlap is on), so the wall time per step can be less than the sum."""
    measured = run["steps"][run["warmup"]:]
    if not measured:
        raise ValueError("no measured steps: --iterations must be at least 1")
    wall = measured[-1]["end_time"] - run["measured_from"]
    rollouts = sum(step["rollouts"] for step in measured)
    stage_seconds = {stage: sum(step["seconds"][stage] for step in measured) / len(measured) for stage in STAGES}
    total = sum(stage_seconds.values())
    figures = {"steps_measured": len(measured), "rollouts_measured": rollouts, "wall_seconds": wall,
               "seconds_per_step": wall / len(measured), "samples_per_second": rollouts / wall,
               "tokens_per_second": sum(step["response_tokens"] for step in measured) / wall,
               "stage_seconds_sum": total}
    for stage, seconds in stage_seconds.items():
        figures[f"{stage}_seconds"] = seconds
        figures[f"{stage}_share"] = seconds / total if total else 0.0
    figures.update({f"peak_memory_bytes_{name}": peak for name, peak in run["peak_memory_bytes"].items()})
    wire = run.get("bytes", {})
    figures.update(wire)
    if wire:
        figures["bytes_moved_per_rollout"] = sum(value for key, value in wire.items() if key.endswith("_per_rollout"))
    for key in ("checkpoint_per_step", "hot_swap_per_step", "rollouts_written", "rollouts_dropped", "settings"):
        if key in run:
            figures[key] = run[key]
    figures.update(measured_from=run["measured_from"], steps=run["steps"])
    return figures


def run_in_process_subprocess(workload: Workload, run_dir: pathlib.Path) -> dict:
    """The in-process mode in a fresh interpreter, so its peak memory is its own."""
    with tempfile.TemporaryDirectory(prefix="belay-bench-") as temp:
        spec, out = pathlib.Path(temp) / "workload.json", pathlib.Path(temp) / "run.json"
        spec.write_text(json.dumps(dataclasses.asdict(workload)))
        done = subprocess.run([sys.executable, "-m", "services.bench.in_process", "--workload", str(spec),
                               "--run-dir", str(run_dir), "--json", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the in-process mode failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def run_trl_subprocess(workload: Workload, python: str) -> dict:
    """services/bench/trl_baseline.py in its own interpreter (its own environment if TRL's pins need one)."""
    with tempfile.TemporaryDirectory(prefix="belay-bench-trl-") as temp:
        out = pathlib.Path(temp) / "trl.json"
        command = [python, "-m", "services.bench.trl_baseline", "--json", str(out),
                   "--model-dir", workload.model_dir, "--reward-dir", workload.reward_dir,
                   "--prompts-file", workload.prompts_file, "--iterations", str(workload.iterations),
                   "--warmup", str(workload.warmup), "--max-new-tokens", str(workload.max_new_tokens),
                   "--batch", str(workload.prompts_per_batch), "--minibatch-size", str(workload.minibatch_size),
                   "--torch-threads", str(workload.torch_threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the TRL baseline failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def comparisons(results: dict) -> dict:
    """Ratios of samples per second between modes, and each target's verdict (MET / MISSED)."""
    def sps(mode: str) -> float:
        return results[mode]["samples_per_second"]

    off, on, in_process = "services_overlap_off", "services_overlap_on", "in_process"
    out = {
        "services_over_in_process_samples_per_second": sps(off) / sps(in_process),
        "services_over_in_process_seconds_per_step":
            results[off]["seconds_per_step"] / results[in_process]["seconds_per_step"],
        "overlap_on_over_overlap_off_samples_per_second": sps(on) / sps(off),
    }
    out["target_services_at_most_10_percent_slower_than_in_process"] = (
        "MET" if out["services_over_in_process_seconds_per_step"] <= SERVICES_SLOWDOWN_TARGET else "MISSED")
    out["target_overlap_on_faster_than_off"] = "MET" if out["overlap_on_over_overlap_off_samples_per_second"] > 1 else "MISSED"
    if "trl" in results:
        out["belay_gae_over_trl_samples_per_second"] = sps("services_overlap_on_gae") / sps("trl")
        out["belay_seed_over_trl_samples_per_second"] = sps(on) / sps("trl")
        out["target_belay_gae_at_least_1_5x_trl"] = (
            "MET" if out["belay_gae_over_trl_samples_per_second"] >= TRL_SPEEDUP_TARGET else "MISSED")
        out["target_belay_seed_at_least_1_5x_trl"] = (
            "MET" if out["belay_seed_over_trl_samples_per_second"] >= TRL_SPEEDUP_TARGET else "MISSED")
    return out


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average_at_start": list(os.getloadavg()),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "time": time.time()}


def run_bench(workload: Workload, run_dir: pathlib.Path, trl: bool, trl_python: str = sys.executable,
              say=print) -> dict:
    results: dict = {"machine": machine(), "workload": dataclasses.asdict(workload)}
    for key, title, max_staleness, advantage in SERVICE_MODES:
        say(f"{title} ...")
        results[key] = mode_figures(run_services(workload, run_dir / key, max_staleness, advantage, say=say))
    say("in one process (no RPC, no queue) ...")
    results["in_process"] = mode_figures(run_in_process_subprocess(workload, run_dir / "in_process"))
    if trl:
        say("TRL PPOTrainer ...")
        results["trl"] = run_trl_subprocess(workload, trl_python)
    results["comparisons"] = comparisons(results)
    return results


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1024
    return ""


def format_mode(key: str, title: str, figures: dict) -> str:
    lines = [f"{title}  [{key}]",
             f"  {figures['steps_measured']} measured steps, {figures['seconds_per_step']:.2f} s/step (wall), "
             f"{figures['samples_per_second']:.3f} samples/s, {figures['tokens_per_second']:.1f} tokens/s",
             f"  {'stage':<20}{'seconds':>10}{'share':>9}"]
    for stage in STAGES:
        lines.append(f"  {stage:<20}{figures[f'{stage}_seconds']:>10.3f}{100 * figures[f'{stage}_share']:>8.1f}%")
    lines.append(f"  {'sum of stages':<20}{figures['stage_seconds_sum']:>10.3f}   (stages may overlap)")
    memory = {k[len("peak_memory_bytes_"):]: v for k, v in figures.items() if k.startswith("peak_memory_bytes_")}
    lines.append("  peak memory: " + ", ".join(f"{name} {_bytes(value)}" for name, value in memory.items()))
    wire = [k for k in figures if k.endswith("_per_rollout")]
    if wire:
        lines.append("  bytes per rollout: " + ", ".join(
            f"{k[:-len('_bytes_per_rollout')]} {_bytes(figures[k])}" for k in wire if k != "bytes_moved_per_rollout")
            + f"; total {_bytes(figures['bytes_moved_per_rollout'])}")
        lines.append(f"  per update: checkpoint {_bytes(figures['checkpoint_bytes_per_update'])} written, "
                     f"{_bytes(figures['hot_swap_read_bytes_per_update'])} of weights read by the hot-swap")
    lines.append(f"  checkpoint every step: {'yes' if figures.get('checkpoint_per_step') else 'no'}; "
                 f"hot-swap: {'yes' if figures.get('hot_swap_per_step') else 'no (one model: the update is already in it)'}")
    return "\n".join(lines)


def format_report(results: dict) -> str:
    titles = {key: title for key, title, _, _ in SERVICE_MODES}
    titles["in_process"] = "in one process (same functions, no RPC, no queue)"
    parts = [f"machine: {results['machine']['cpu_count']} CPUs, load average at start "
             f"{results['machine']['load_average_at_start'][0]:.2f}; workload: {results['workload']['prompts_per_batch']} "
             f"prompts/batch, {results['workload']['max_new_tokens']} new tokens, {results['workload']['ppo_epochs']} "
             f"PPO epoch, {results['workload']['iterations']} measured steps after {results['workload']['warmup']} warm-up"]
    for key in titles:
        parts.append(format_mode(key, titles[key], results[key]))
    if "trl" in results:
        trl = results["trl"]
        parts.append(f"TRL PPOTrainer [trl]\n  {trl['seconds_per_step']:.2f} s/step, {trl['samples_per_second']:.3f} "
                     f"samples/s, {trl['tokens_per_second']:.1f} tokens/s, peak memory {_bytes(trl['peak_memory_bytes'])}")
    c = results["comparisons"]
    lines = ["comparisons:",
             f"  services (overlap off) / in-process seconds per step: {c['services_over_in_process_seconds_per_step']:.3f}"
             f" (target <= {SERVICES_SLOWDOWN_TARGET:.2f}): {c['target_services_at_most_10_percent_slower_than_in_process']}",
             f"  overlap on / off samples per second: {c['overlap_on_over_overlap_off_samples_per_second']:.3f}"
             f" (target > 1 where cores allow; this machine has {results['machine']['cpu_count']}): "
             f"{c['target_overlap_on_faster_than_off']}"]
    if "trl" in results:
        lines += [f"  Belay GAE / TRL samples per second: {c['belay_gae_over_trl_samples_per_second']:.3f} (target >= "
                  f"{TRL_SPEEDUP_TARGET}): {c['target_belay_gae_at_least_1_5x_trl']}",
                  f"  Belay seed recipe / TRL samples per second: {c['belay_seed_over_trl_samples_per_second']:.3f} "
                  f"(target >= {TRL_SPEEDUP_TARGET}): {c['target_belay_seed_at_least_1_5x_trl']}"]
    else:
        lines.append("  TRL: not run (--no-trl)")
    parts.append("\n".join(lines))
    return "\n\n".join(parts)
