"""The bench's report for a person: each mode's stages, throughput, memory and hand-off, the transports,
the projection and the comparisons with their targets, as text."""

from __future__ import annotations

from .bench_step import STAGES
from .figures import (
    GB,
    HOT_SWAP_TARGET_SECONDS,
    PUBLISH_TARGET_SECONDS,
    SERVICE_MODES,
    SERVICES_SLOWDOWN_TARGET,
    TRL_DEFAULT_SPEEDUP_TARGET,
    TRL_GAE_SPEEDUP_TARGET,
)


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
