"""The figures of a bench run: each mode's from its raw steps, the weight transports', the hand-off
projected to larger models, and the comparisons between modes with each target's verdict. Pure
functions of the runs' dicts."""

from __future__ import annotations

import statistics

from .bench_step import STAGES, BenchStep

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
GB = 1e9


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mode_figures(run: dict) -> dict:
    """One flat dict per mode (seconds and bytes in base units) from its raw run. The shares are of
    the summed stage time: stages can overlap (reference with reward; generation with the update
    when overlap is on), so the wall time per step can be less than the sum. publish and persist are
    the trainer's critical-path parts; a persist's background write is off it and reported apart."""
    measured = [BenchStep.from_dict(step) for step in run["steps"][run["warmup"] :]]
    if not measured:
        raise ValueError("no measured steps: --iterations must be at least 1")
    wall = measured[-1].end_time - run["measured_from"]
    rollouts = sum(step.rollouts for step in measured)
    stage_seconds = {stage: sum(step.seconds[stage] for step in measured) / len(measured) for stage in STAGES}
    total = sum(stage_seconds.values())
    figures = {
        "steps_measured": len(measured),
        "rollouts_measured": rollouts,
        "wall_seconds": wall,
        "seconds_per_step": wall / len(measured),
        "samples_per_second": rollouts / wall,
        "tokens_per_second": sum(step.response_tokens for step in measured) / wall,
        "stage_seconds_sum": total,
    }
    for stage, seconds in stage_seconds.items():
        figures[f"{stage}_seconds"] = seconds
        figures[f"{stage}_share"] = seconds / total if total else 0.0
    figures.update({f"peak_memory_bytes_{name}": peak for name, peak in run["peak_memory_bytes"].items()})
    wire = run.get("bytes", {})
    figures.update(wire)
    figures["bytes_moved_per_rollout"] = sum(value for key, value in wire.items() if key.endswith("_per_rollout"))
    figures.update(handoff_figures(run, measured))
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


def handoff_figures(run: dict, measured: list[BenchStep]) -> dict:
    """The weight hand-off's figures of one mode: the policy's swap (seconds per swap, over the measured
    steps that followed one), publish bandwidth, and persist (how often, and its background write)."""
    swaps = [step.seconds["hot_swap"] for step in measured if step.seconds["hot_swap"] > 0]
    publish_seconds = sum(step.seconds["publish"] for step in measured)
    publish_bytes = sum(step.publish_bytes for step in measured)
    every = run["checkpoint_every_steps"]
    writes = list(run.get("persist_writes_seconds", {}).values())
    per_persist = _mean(writes)
    checkpoint_bytes = run.get("bytes", {}).get("checkpoint_bytes_per_persist")
    return {
        "hot_swap_seconds_per_swap": _mean(swaps),
        "publish_bytes_per_second": publish_bytes / publish_seconds if publish_seconds > 0 else None,
        "persists_measured": sum(1 for step in measured if step.seconds["persist"] > 0),
        "checkpoint_every_steps": every,
        "persist_writes": len(writes),
        "persist_background_seconds_per_persist": per_persist,
        "persist_background_seconds_per_update": per_persist / every if per_persist is not None else None,
        "persist_write_bytes_per_second": (
            checkpoint_bytes / per_persist if per_persist and checkpoint_bytes else None
        ),
    }


def repeated(first: dict, again: list[dict]) -> dict:
    """A mode's first run's figures, with the seconds per step of every run and their median."""
    runs = [first["seconds_per_step"], *(figures["seconds_per_step"] for figures in again)]
    return {**first, "seconds_per_step_runs": runs, "seconds_per_step_median": statistics.median(runs)}


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
