"""The end-of-run report `belay up` writes: training.png (reward, KL, response length and entropy
over the run's steps, rollbacks marked) and report.md (the figures first and last, the detectors
that fired, and the canary prompts' answers at the first and last version side by side)."""

from __future__ import annotations

import pathlib

from ..common.step_records import RollbackRecord, StepRecord, TrainerRecord

PANELS = [
    ("reward_mean", "reward (mean ± std of the batch)"),
    ("kl_per_sequence", "KL(policy || reference), nats/response"),
    ("response_length_mean", "response length, tokens"),
    ("entropy", "policy entropy, nats/token"),
]


def plot_training(steps: list[TrainerRecord], path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [s for s in steps if isinstance(s, StepRecord)]
    rollbacks = [s.version for s in steps if isinstance(s, RollbackRecord)]
    versions = [s.version for s in trained]
    figure, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for axis, (key, title) in zip(axes.flat, PANELS):
        values = [getattr(s.stats, key) for s in trained]
        axis.plot(versions, values, "o-", markersize=3)
        if key == "reward_mean":
            std = [s.stats.reward_std for s in trained]
            axis.fill_between(
                versions, [v - d for v, d in zip(values, std)], [v + d for v, d in zip(values, std)], alpha=0.2
            )
        for version in rollbacks:
            axis.axvline(version, color="red", linestyle="--", linewidth=1)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("policy version (one PPO update each)")
    figure.suptitle("Belay run" + (f" ({len(rollbacks)} rollback(s), dashed)" if rollbacks else ""))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def canary_table(canaries: dict[int, dict]) -> list[str]:
    """Markdown rows: each canary prompt, its first and last version's answers, and the drift."""
    if not canaries:
        return ["(no canary answers were recorded: policy.canary_prompts_file is empty)"]
    first, last = canaries[min(canaries)], canaries[max(canaries)]
    cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        f"Canary drift from version {first['version']} to version {last['version']}: {last['drift']:.3f} "
        "(0: the same answers, 1: nothing in common).",
        "",
        f"| prompt | version {first['version']} | version {last['version']} |",
        "|---|---|---|",
    ]
    for prompt, before, after in zip(first["prompts"], first["outputs"], last["outputs"]):
        lines.append(f"| {cell(prompt)} | {cell(before)} | {cell(after)} |")
    return lines + [""] + signal_table(canaries)


def number(value: float | None, spec: str = ".2f") -> str:
    """A figure of a canary record; None (stored for NaN: an empty answer's ratios) as n/a."""
    return "n/a" if value is None else format(value, spec)


def signal_table(canaries: dict[int, dict]) -> list[str]:
    """Markdown rows: the greedy-degeneration signals of each canary answer at the first and last
    version (services/common/degeneration.py), and every version that had a degenerate answer."""
    first, last = canaries[min(canaries)], canaries[max(canaries)]
    if "signals" not in last:
        return []
    degenerate = [
        f"{v} (canaries {', '.join(map(str, r['degenerate']))})" for v, r in canaries.items() if r.get("degenerate")
    ]
    lines = [
        f"Versions with degenerate canary answers: {', '.join(degenerate) if degenerate else 'none'}.",
        "",
        "| canary | version | repeated 3-grams | longest repeat (words) | compression ratio | length / v0 "
        "| relevance (change from v0) | degenerate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index in range(len(last["signals"])):
        for record in (first, last) if first is not last else (last,):
            s = record.get("signals", [])[index] if len(record.get("signals", [])) > index else None
            if s is not None:
                lines.append(
                    f"| {index} | {record['version']} | {number(s['repeated_ngram_share'])} "
                    f"| {s['longest_repeated_span']} | {number(s['compression_ratio'])} | {number(s['length_ratio'])} "
                    f"| {number(s['relevance'])} ({number(s['relevance_change'], '+.2f')}) "
                    f"| {'yes' if s['degenerate'] else 'no'} |"
                )
    return lines


def write_run_report(steps: list[TrainerRecord], canaries: dict[int, dict], out_dir: pathlib.Path) -> pathlib.Path:
    """training.png and report.md in out_dir; returns report.md's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = [s for s in steps if isinstance(s, StepRecord)]
    lines = ["# Belay run report", ""]
    if trained:
        plot_training(steps, out_dir / "training.png")
        first, last = trained[0], trained[-1]
        lines += [
            "![reward, KL, length and entropy over the run](training.png)",
            "",
            "| signal | first step | last step |",
            "|---|---|---|",
        ]
        for key, title in PANELS:
            lines.append(f"| {title} | {getattr(first.stats, key):.4g} | {getattr(last.stats, key):.4g} |")
        fired = sorted({name for s in trained for name in s.detectors_firing})
        lines += [
            "",
            f"Rollbacks: {sum(1 for s in steps if isinstance(s, RollbackRecord))}. "
            f"Detectors that fired: {', '.join(fired) if fired else 'none'}.",
            "",
        ]
    else:
        lines += ["No PPO step was published.", ""]
    lines += ["## Canary prompts, first and last version", ""] + canary_table(canaries)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
