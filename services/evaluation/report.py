"""What `belay eval` prints and writes: a side-by-side table, results.json and PNG plots."""

from __future__ import annotations

import pathlib

from ..common.strict_json import strict_json

COLUMNS = [
    ("accuracy", "accuracy", "{:.3f}"),  # only when the held-out rows carry answers
    ("reward_mean", "reward", "{:+.3f}"),
    ("reward_std", "± std", "{:.3f}"),
    ("kl_per_sequence", "KL/seq", "{:.3f}"),
    ("kl_exact_per_token", "KL/token", "{:.4f}"),
    ("response_length", "length", "{:.1f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("repetition_3", "repeat-3", "{:.3f}"),
    ("perplexity", "perplexity", "{:.2f}"),
]


def table(results: dict) -> str:
    models = results["models"]
    width = max(len(name) for name in models) + 2
    columns = [column for column in COLUMNS if all(column[0] in row for row in models.values())]
    lines = [" " * width + "".join(f"{title:>12s}" for _, title, _ in columns)]
    for name, row in models.items():
        lines.append(f"{name:<{width}s}" + "".join(f"{fmt.format(row[key]):>12s}" for key, _, fmt in columns))
    return "\n".join(lines)


def write(results: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """results.json, frontier.png (reward against KL, the path the run traced) and perplexity.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(strict_json(results, indent=1))
    names = list(results["models"])
    rows = [results["models"][n] for n in names]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["kl_per_sequence"] for r in rows], [r["reward_mean"] for r in rows], "o-")
    for name, row in zip(names, rows):
        axis.annotate(name, (row["kl_per_sequence"], row["reward_mean"]), fontsize=8)
    axis.set(
        xlabel="KL to the reference per response (nats)", ylabel="held-out reward (mean)", title="reward against KL"
    )
    figure.tight_layout()
    figure.savefig(out_dir / "frontier.png", dpi=100)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(names, [r["perplexity"] for r in rows])
    axis.set(ylabel="perplexity on held-out text", title="still a normal model?")
    figure.tight_layout()
    figure.savefig(out_dir / "perplexity.png", dpi=100)
    plt.close(figure)
    return [out_dir / "results.json", out_dir / "frontier.png", out_dir / "perplexity.png"]
