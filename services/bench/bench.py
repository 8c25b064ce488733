"""`belay bench`: the fixed workload as services (overlap off, overlap on, overlap on with GAE),
in one process, and in TRL; per-stage figures, throughput, memory and bytes, the weight hand-off
(publish every update, persist every checkpoint_every_steps: seconds on and off the trainer's
critical path, bytes per transport, measured GB/s) and its projection to larger models, then the
comparisons with the targets. Figures come from the steps after `warmup`; every raw step is kept."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .services_mode import STAGE_KEYS, run_services
from .workload import Workload

STAGES = tuple(STAGE_KEYS)
# (JSON key, title, trainer.max_staleness, trainer.advantage) of each run of the real stack
SERVICE_MODES = (
    ("services_overlap_off", "services, overlap off (max_staleness 0), seed recipe (batch_mean)", 0, "batch_mean"),
    ("services_overlap_on", "services, overlap on (max_staleness 1), seed recipe (batch_mean)", 1, "batch_mean"),
    (
        "services_overlap_on_gae",
        "services, overlap on (max_staleness 1), GAE with a value head on the policy's trunk (TRL's estimator)",
        1,
        "gae",
    ),
)
SERVICES_SLOWDOWN_TARGET = 1.10  # overlap-off services' median seconds per step at most 10% above in-process
TRL_DEFAULT_SPEEDUP_TARGET = 1.5  # Belay's default mode (overlap on, seed recipe): at least 1.5x TRL's samples/s
TRL_GAE_SPEEDUP_TARGET = 1.3  # Belay with GAE: at least 1.3x TRL's samples/s
HOT_SWAP_TARGET_SECONDS = 0.1  # the policy's swap, per swap, at 135M
PUBLISH_TARGET_SECONDS = 0.3  # publish on the trainer's critical path, per update, at 135M
JUDGED_PARAMETERS = (100e6, 200e6)  # the swap and publish targets are for the 135M model only
NOT_JUDGED = "not judged at this size"

# The projection: Qwen2.5 shapes (parameters), and the bytes per parameter of each hand-off.
PROJECTION_SIZES = (("0.5B", 0.494e9), ("1.5B", 1.54e9), ("7B", 7.62e9))
PUBLISH_BYTES_PER_PARAMETER = 2  # bf16 serving weights
PERSIST_BYTES_PER_PARAMETER = 12  # fp32 weights (4) + AdamW's two fp32 moments (8)
NVLINK4_BYTES_PER_SECOND = 450e9  # H100/H200 NVLink 4, one direction: the nominal figure
PCIE5_X16_BYTES_PER_SECOND = 64e9  # PCIe Gen5 x16, one direction: the nominal figure
BROADCAST_PROBE_BYTES = 256 * 2**20
GB = 1e9


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mode_figures(run: dict) -> dict:
    """One flat dict per mode (seconds and bytes in base units) from its raw run. The shares are of
    the summed stage time: stages can overlap (reference with reward; generation with the update
    when overlap is on), so the wall time per step can be less than the sum. publish and persist are
    the trainer's critical-path parts; a persist's background write is off it and reported apart."""
    measured = run["steps"][run["warmup"] :]
    if not measured:
        raise ValueError("no measured steps: --iterations must be at least 1")
    wall = measured[-1]["end_time"] - run["measured_from"]
    rollouts = sum(step["rollouts"] for step in measured)
    stage_seconds = {stage: sum(step["seconds"][stage] for step in measured) / len(measured) for stage in STAGES}
    total = sum(stage_seconds.values())
    figures = {
        "steps_measured": len(measured),
        "rollouts_measured": rollouts,
        "wall_seconds": wall,
        "seconds_per_step": wall / len(measured),
        "samples_per_second": rollouts / wall,
        "tokens_per_second": sum(step["response_tokens"] for step in measured) / wall,
        "stage_seconds_sum": total,
    }
    for stage, seconds in stage_seconds.items():
        figures[f"{stage}_seconds"] = seconds
        figures[f"{stage}_share"] = seconds / total if total else 0.0
    figures.update({f"peak_memory_bytes_{name}": peak for name, peak in run["peak_memory_bytes"].items()})
    wire = run.get("bytes", {})
    figures.update(wire)
    figures["bytes_moved_per_rollout"] = sum(value for key, value in wire.items() if key.endswith("_per_rollout"))
    # The hand-off. Swap: seconds per swap, over the measured steps that followed one.
    swaps = [step["seconds"]["hot_swap"] for step in measured if step["seconds"]["hot_swap"] > 0]
    figures["hot_swap_seconds_per_swap"] = _mean(swaps)
    publish_seconds = sum(step["seconds"]["publish"] for step in measured)
    publish_bytes = sum(step.get("publish_bytes", 0) for step in measured)
    figures["publish_bytes_per_second"] = publish_bytes / publish_seconds if publish_seconds > 0 else None
    figures["persists_measured"] = sum(1 for step in measured if step["seconds"]["persist"] > 0)
    every = run["checkpoint_every_steps"]
    writes = list(run.get("persist_writes_seconds", {}).values())
    per_persist = _mean(writes)
    figures.update(
        checkpoint_every_steps=every,
        persist_writes=len(writes),
        persist_background_seconds_per_persist=per_persist,
        persist_background_seconds_per_update=per_persist / every if per_persist is not None else None,
        persist_write_bytes_per_second=(
            wire["checkpoint_bytes_per_persist"] / per_persist
            if per_persist and wire.get("checkpoint_bytes_per_persist")
            else None
        ),
    )
    for key in (
        "hot_swap_per_step",
        "weight_transport",
        "model_parameters",
        "serving_tensor_bytes",
        "persist_writes_seconds",
        "persist_wait_at_end_seconds",
        "rollouts_written",
        "rollouts_dropped",
        "settings",
    ):
        if key in run:
            figures[key] = run[key]
    figures.update(measured_from=run["measured_from"], steps=run["steps"])
    return figures


def repeated(first: dict, again: list[dict]) -> dict:
    """A mode's first run's figures, with the seconds per step of every run and their median."""
    runs = [first["seconds_per_step"], *(figures["seconds_per_step"] for figures in again)]
    return {**first, "seconds_per_step_runs": runs, "seconds_per_step_median": statistics.median(runs)}


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


def transports(results: dict, broadcast: dict) -> dict:
    """Bytes per update each transport moves here, and the bandwidths measured on this machine."""
    services = [results[key] for key, *_ in SERVICE_MODES]
    measured = [step for f in services for step in f["steps"][-f["steps_measured"] :]]
    publish_seconds = sum(step["seconds"]["publish"] for step in measured)
    publish_bytes = sum(step.get("publish_bytes", 0) for step in measured)
    writes = [
        (f["checkpoint_bytes_per_persist"], seconds)
        for f in services
        for seconds in f.get("persist_writes_seconds", {}).values()
        if seconds > 0
    ]
    persist_seconds = sum(seconds for _, seconds in writes)
    return {
        "file_bytes_per_update": _mean([f["publish_bytes_per_update"] for f in services]),
        "file_bytes_per_second": publish_bytes / publish_seconds if publish_seconds > 0 else None,
        "broadcast_bytes_per_update_per_replica": results["in_process"].get("serving_tensor_bytes"),
        "cuda_ipc_bytes_per_update": results["in_process"].get("serving_tensor_bytes"),
        "broadcast_bytes_per_second": broadcast["bytes_per_second"],
        "broadcast_status": broadcast["status"],
        "persist_write_bytes_per_second": (
            sum(b for b, _ in writes) / persist_seconds if persist_seconds > 0 else None
        ),
    }


def projection(measured: dict, checkpoint_every_steps: int) -> dict:
    """Bytes and seconds of the hand-off at Qwen2.5's sizes: publish (bf16 weights, every update) and
    persist (fp32 weights + AdamW moments, every checkpoint_every_steps), at the file transport's
    bandwidth measured here, NVLink 4 and PCIe Gen5 x16 (nominal), and persist at the write speed here."""
    bandwidths = {
        "file_here": measured["file_bytes_per_second"],
        "nvlink4": NVLINK4_BYTES_PER_SECOND,
        "pcie5_x16": PCIE5_X16_BYTES_PER_SECOND,
    }
    rows = {}
    for name, parameters in PROJECTION_SIZES:
        publish = PUBLISH_BYTES_PER_PARAMETER * parameters
        persist = PERSIST_BYTES_PER_PARAMETER * parameters
        row = {
            "parameters": parameters,
            "publish_bytes_per_update": publish,
            "persist_bytes_per_persist": persist,
            "persist_bytes_per_update": persist / checkpoint_every_steps,
        }
        for where, bandwidth in bandwidths.items():
            row[f"publish_seconds_{where}"] = publish / bandwidth if bandwidth else None
            row[f"persist_seconds_per_persist_{where}"] = persist / bandwidth if bandwidth else None
        write = measured["persist_write_bytes_per_second"]
        row["persist_seconds_per_persist_write_here"] = persist / write if write else None
        rows[name] = row
    return {
        "assumptions": {
            "shapes": "Qwen2.5 0.5B / 1.5B / 7B parameter counts",
            "publish_bytes_per_parameter": PUBLISH_BYTES_PER_PARAMETER,
            "persist_bytes_per_parameter": PERSIST_BYTES_PER_PARAMETER,
            "checkpoint_every_steps": checkpoint_every_steps,
            "file_here_bytes_per_second": measured["file_bytes_per_second"],
            "persist_write_here_bytes_per_second": measured["persist_write_bytes_per_second"],
            "nvlink4_bytes_per_second": NVLINK4_BYTES_PER_SECOND,
            "pcie5_x16_bytes_per_second": PCIE5_X16_BYTES_PER_SECOND,
        },
        "rows": rows,
    }


def _verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def comparisons(results: dict) -> dict:
    """Ratios between modes, and each target's verdict (MET / MISSED / not judged at this size)."""

    def sps(mode: str) -> float:
        return results[mode]["samples_per_second"]

    off, on, gae, in_process = "services_overlap_off", "services_overlap_on", "services_overlap_on_gae", "in_process"
    off_median = results[off].get("seconds_per_step_median", results[off]["seconds_per_step"])
    alone_median = results[in_process].get("seconds_per_step_median", results[in_process]["seconds_per_step"])
    out = {
        "services_over_in_process_samples_per_second": sps(off) / sps(in_process),
        "repeats": len(results[off].get("seconds_per_step_runs", [None])),
        "services_overlap_off_over_in_process_median_seconds_per_step": off_median / alone_median,
        "overlap_on_over_overlap_off_samples_per_second": sps(on) / sps(off),
    }
    out["target_services_overlap_off_within_10_percent_of_in_process"] = _verdict(
        out["services_overlap_off_over_in_process_median_seconds_per_step"] <= SERVICES_SLOWDOWN_TARGET
    )
    if "trl" in results:
        out["belay_default_over_trl_samples_per_second"] = sps(on) / sps("trl")
        out["belay_gae_over_trl_samples_per_second"] = sps(gae) / sps("trl")
        out["target_belay_default_at_least_1_5x_trl"] = _verdict(
            out["belay_default_over_trl_samples_per_second"] >= TRL_DEFAULT_SPEEDUP_TARGET
        )
        out["target_belay_gae_at_least_1_3x_trl"] = _verdict(
            out["belay_gae_over_trl_samples_per_second"] >= TRL_GAE_SPEEDUP_TARGET
        )
    services = [results[key] for key, *_ in SERVICE_MODES]
    swaps = [f["hot_swap_seconds_per_swap"] for f in services if f["hot_swap_seconds_per_swap"] is not None]
    out["hot_swap_seconds_per_swap_max"] = max(swaps) if swaps else None
    out["publish_seconds_per_update_max"] = max(f["publish_seconds"] for f in services)
    out["model_parameters"] = parameters = results[in_process]["model_parameters"]
    judged = JUDGED_PARAMETERS[0] <= parameters <= JUDGED_PARAMETERS[1]
    out["target_hot_swap_at_most_0_1_s_at_135m"] = (
        NOT_JUDGED
        if not judged
        else "not measured (no swap in the measured steps)"
        if out["hot_swap_seconds_per_swap_max"] is None
        else _verdict(out["hot_swap_seconds_per_swap_max"] <= HOT_SWAP_TARGET_SECONDS)
    )
    out["target_publish_at_most_0_3_s_at_135m"] = (
        _verdict(out["publish_seconds_per_update_max"] <= PUBLISH_TARGET_SECONDS) if judged else NOT_JUDGED
    )
    return out


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


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1024
    return ""


def _seconds(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} s"


def _rate(value: float | None) -> str:
    if value is None:
        return "not measured"
    return f"{value / GB:.2f} GB/s" if value >= 0.1 * GB else f"{value / 1e6:.1f} MB/s"


CRITICAL_PATH = {"publish": "publish (critical)", "persist": "persist (critical)"}


def format_mode(key: str, title: str, figures: dict) -> str:
    lines = [
        f"{title}  [{key}]",
        f"  {figures['steps_measured']} measured steps, {figures['seconds_per_step']:.2f} s/step (wall), "
        f"{figures['samples_per_second']:.3f} samples/s, {figures['tokens_per_second']:.1f} tokens/s",
    ]
    if "seconds_per_step_runs" in figures:
        lines.append(
            f"  {len(figures['seconds_per_step_runs'])} runs: s/step "
            + ", ".join(f"{value:.2f}" for value in figures["seconds_per_step_runs"])
            + f"; median {figures['seconds_per_step_median']:.2f}"
        )
    lines.append(f"  {'stage':<20}{'seconds':>10}{'share':>9}")
    for stage in STAGES:
        lines.append(
            f"  {CRITICAL_PATH.get(stage, stage):<20}{figures[f'{stage}_seconds']:>10.3f}"
            f"{100 * figures[f'{stage}_share']:>8.1f}%"
        )
    lines.append(f"  {'sum of stages':<20}{figures['stage_seconds_sum']:>10.3f}   (stages may overlap)")
    memory = {k[len("peak_memory_bytes_") :]: v for k, v in figures.items() if k.startswith("peak_memory_bytes_")}
    lines.append("  peak memory: " + ", ".join(f"{name} {_bytes(value)}" for name, value in memory.items()))
    wire = [k for k in figures if k.endswith("_bytes_per_rollout")]
    if wire:
        lines.append(
            "  bytes per rollout: "
            + ", ".join(f"{k[: -len('_bytes_per_rollout')]} {_bytes(figures[k])}" for k in wire)
            + f"; total {_bytes(figures['bytes_moved_per_rollout'])}"
        )
    if figures.get("hot_swap_per_step"):
        lines.append(
            f"  publish ({figures['weight_transport']} transport): {_bytes(figures['publish_bytes_per_update'])}"
            f" per update, {_seconds(figures['publish_seconds'])} on the trainer's critical path "
            f"({_rate(figures['publish_bytes_per_second'])}); the policy's swap "
            f"{_seconds(figures['hot_swap_seconds_per_swap'])} per swap"
        )
    else:
        lines.append(
            "  publish: none, reported as 0 (one model: the update is already in the weights it samples "
            "with, no hand-off and no hot-swap)"
        )
    every, writes = figures["checkpoint_every_steps"], figures["persist_writes"]
    if writes:
        persisted = (
            f"{_bytes(figures['checkpoint_bytes_per_persist'])} per persist "
            f"({_bytes(figures['persist_bytes_per_update'])} per update); in the background "
            f"{_seconds(figures['persist_background_seconds_per_persist'])} per persist "
            f"({_seconds(figures['persist_background_seconds_per_update'])} per update), "
            f"{_rate(figures['persist_write_bytes_per_second'])}, over {writes} write(s) in the run"
        )
    else:
        persisted = "no persist written in this run"
    lines.append(
        f"  persist every {every} updates: {figures['persists_measured']} in the measured steps, "
        f"{_seconds(figures['persist_seconds'])} per step on the critical path (snapshot + wait); " + persisted
    )
    return "\n".join(lines)


def format_transports(t: dict) -> str:
    return "\n".join(
        [
            "weight transports (bytes per update, bandwidth here):",
            f"  file       {_bytes(t['file_bytes_per_update'])} written to run.publish_dir and mapped by the policy; "
            f"{_rate(t['file_bytes_per_second'])} (publish bytes / publish seconds over the services modes' measured "
            "steps; the seconds include the Redis announcement and the UpdateWeights push)",
            f"  broadcast  {_bytes(t['broadcast_bytes_per_update_per_replica'])} per replica (the serving tensors); "
            + (
                _rate(t["broadcast_bytes_per_second"]) + f" ({t['broadcast_status']})"
                if t["broadcast_bytes_per_second"] is not None
                else t["broadcast_status"]
            ),
            f"  cuda_ipc   {_bytes(t['cuda_ipc_bytes_per_update'])} of serving tensors shared by handle on one GPU; "
            "not measured (needs a policy on the trainer's GPU)",
            f"  persist    write {_rate(t['persist_write_bytes_per_second'])} (checkpoint bytes / background write "
            "seconds over the services modes; the seconds include the XACK and pruning)",
        ]
    )


def format_projection(projection: dict) -> str:
    a, rows = projection["assumptions"], projection["rows"]
    every = a["checkpoint_every_steps"]

    def cell(value: float | None) -> str:
        return f"{'n/a':>11}" if value is None else f"{value:>11.3f}"

    lines = [
        "projection of the hand-off (assumptions:",
        f"  {a['shapes']}; publish {a['publish_bytes_per_parameter']} bytes/parameter (bf16 weights) every update;"
        f" persist {a['persist_bytes_per_parameter']} bytes/parameter (fp32 weights 4 + AdamW moments 8) "
        f"every {every} updates;",
        f"  bandwidths: file transport here {_rate(a['file_here_bytes_per_second'])} (measured on this "
        "workload's model; it includes the fixed cost of the announcement and the push), NVLink 4 "
        f"(H100/H200) {a['nvlink4_bytes_per_second'] / GB:.0f} GB/s one direction (nominal), PCIe Gen5 x16 "
        f"{a['pcie5_x16_bytes_per_second'] / GB:.0f} GB/s (nominal), persist write here "
        f"{_rate(a['persist_write_here_bytes_per_second'])} (measured))",
        "  columns: bytes published per update and persisted per persist; then seconds of one publish at the "
        "file transport here, NVLink 4, PCIe Gen5 x16, and of one persist at the same three and at the persist "
        "write speed here",
        f"  {'size':<6}{'pub B':>11}{'persist B':>11}{'pub@file':>11}{'pub@NVL4':>11}{'pub@PCIe5':>11}"
        f"{'per@file':>11}{'per@NVL4':>11}{'per@PCIe5':>11}{'per@disk':>11}",
    ]
    for name, row in rows.items():
        lines.append(
            f"  {name:<6}{_bytes(row['publish_bytes_per_update']):>11}{_bytes(row['persist_bytes_per_persist']):>11}"
            + "".join(cell(row[f"publish_seconds_{w}"]) for w in ("file_here", "nvlink4", "pcie5_x16"))
            + "".join(cell(row[f"persist_seconds_per_persist_{w}"]) for w in ("file_here", "nvlink4", "pcie5_x16"))
            + cell(row["persist_seconds_per_persist_write_here"])
        )
    lines.append(
        f"  (a persist's seconds are off the trainer's critical path but for its snapshot copy; per update "
        f"they are 1/{every} of the above)"
    )
    return "\n".join(lines)


def format_report(results: dict) -> str:
    titles = {key: title for key, title, _, _ in SERVICE_MODES}
    titles["in_process"] = "in one process (same functions, no RPC, no queue)"
    parts = [
        f"machine: {results['machine']['cpu_count']} CPUs, load average at start "
        f"{results['machine']['load_average_at_start'][0]:.2f}; workload: {results['workload']['prompts_per_batch']} "
        f"prompts/batch, {results['workload']['max_new_tokens']} new tokens, {results['workload']['ppo_epochs']} "
        f"PPO epoch, {results['workload']['iterations']} measured steps after {results['workload']['warmup']} warm-up, "
        f"persist every {results['workload']['checkpoint_every_steps']} updates"
    ]
    for key in titles:
        parts.append(format_mode(key, titles[key], results[key]))
    if "trl" in results:
        trl = results["trl"]
        parts.append(
            f"TRL PPOTrainer [trl]\n  {trl['seconds_per_step']:.2f} s/step, {trl['samples_per_second']:.3f} "
            f"samples/s, {trl['tokens_per_second']:.1f} tokens/s, peak memory {_bytes(trl['peak_memory_bytes'])}"
        )
    parts.append(format_transports(results["transports"]))
    parts.append(format_projection(results["projection"]))
    c = results["comparisons"]
    lines = [
        "comparisons:",
        f"  services overlap off / in-process, median seconds per step of {c['repeats']} run(s) each: "
        f"{c['services_overlap_off_over_in_process_median_seconds_per_step']:.3f} (target <= "
        f"{SERVICES_SLOWDOWN_TARGET:.2f}): {c['target_services_overlap_off_within_10_percent_of_in_process']}",
        f"  overlap on / off samples per second: {c['overlap_on_over_overlap_off_samples_per_second']:.3f}"
        f" (this machine has {results['machine']['cpu_count']} CPUs)",
    ]
    if "trl" in results:
        lines += [
            f"  Belay default (overlap on, seed recipe) / TRL samples per second: "
            f"{c['belay_default_over_trl_samples_per_second']:.3f} (target >= {TRL_DEFAULT_SPEEDUP_TARGET}): "
            f"{c['target_belay_default_at_least_1_5x_trl']}",
            f"  Belay GAE / TRL samples per second: {c['belay_gae_over_trl_samples_per_second']:.3f} (target >= "
            f"{TRL_GAE_SPEEDUP_TARGET}): {c['target_belay_gae_at_least_1_3x_trl']}",
        ]
    else:
        lines.append("  TRL: not run (--no-trl)")
    size = f"model of {c['model_parameters']:,} parameters"
    lines += [
        f"  policy's swap, worst services mode: {_seconds(c['hot_swap_seconds_per_swap_max'])} per swap "
        f"(target <= {HOT_SWAP_TARGET_SECONDS} s at 135M; {size}): {c['target_hot_swap_at_most_0_1_s_at_135m']}",
        f"  publish on the trainer's critical path, worst services mode: "
        f"{_seconds(c['publish_seconds_per_update_max'])} per update (target <= {PUBLISH_TARGET_SECONDS} s at "
        f"135M; {size}): {c['target_publish_at_most_0_3_s_at_135m']}",
    ]
    parts.append("\n".join(lines))
    return "\n\n".join(parts)
