"""The end-of-run report: the PNG holds the four panels' data, report.md the first and last figures
and the canary answers side by side."""

import matplotlib

matplotlib.use("Agg")
from matplotlib.image import imread  # noqa: E402

from services.common.step_records import RollbackRecord  # noqa: E402
from services.evaluation.run_report import canary_table, write_run_report  # noqa: E402
from tests.step_records import make_step_record  # noqa: E402


def step(version: int, reward: float, kl: float, length: float, entropy: float, detectors_firing=()):
    return make_step_record(
        version,
        detectors_firing=list(detectors_firing),
        reward_mean=reward,
        reward_std=0.1,
        kl_per_sequence=kl,
        response_length_mean=length,
        entropy=entropy,
    )


def test_report_has_plots_figures_and_canaries(tmp_path):
    steps = [
        step(1, 0.1, 0.0, 20, 2.5),
        step(2, 0.3, 1.5, 18, 2.4, ["shorter"]),
        RollbackRecord(version=3, rolled_back_to=1, batch_kl=40.0, kl_coef=0.1, lr=1e-5, time=0.0),
        step(4, 0.35, 0.7, 19, 2.45),
    ]
    canaries = {
        0: {"version": 0, "prompts": ["Hi?", "Sky | colour?"], "outputs": ["Hello.", "Blue."], "drift": 0.0},
        4: {
            "version": 4,
            "prompts": ["Hi?", "Sky | colour?"],
            "outputs": ["Hello there!", "Blue\nsky."],
            "drift": 0.42,
        },
    }
    path = write_run_report(steps, canaries, tmp_path / "report")
    image = imread(tmp_path / "report" / "training.png")
    assert image.shape[0] > 400 and image.shape[1] > 600
    text = path.read_text()
    assert "| reward (mean ± std of the batch) | 0.1 | 0.35 |" in text
    assert "| KL(policy || reference), nats/response | 0 | 0.7 |" in text
    assert "| response length, tokens | 20 | 19 |" in text
    assert "Rollbacks: 1. Detectors that fired: shorter." in text
    assert "drift from version 0 to version 4: 0.420" in text
    assert "| Sky \\| colour? | Blue. | Blue sky. |" in text  # pipes escaped, newlines flattened


def test_no_canaries_and_no_steps_say_so(tmp_path):
    assert "no canary answers" in canary_table({})[0]
    text = write_run_report([], {}, tmp_path).read_text()
    assert "No PPO step was published." in text and not (tmp_path / "training.png").exists()


def signals(share: float, relevance: float, change: float, degenerate: bool) -> dict:
    return {
        "repeated_ngram_share": share,
        "longest_repeated_span": 4,
        "compression_ratio": 1.25,
        "length_ratio": 1.5,
        "relevance": relevance,
        "relevance_change": change,
        "degenerate": degenerate,
    }


def test_report_lists_each_canarys_signals_at_the_first_and_last_version_and_the_degenerate_versions():
    prompts = ["Hi?", "Day?"]
    canaries = {
        0: {"version": 0, "prompts": prompts, "outputs": ["a", "b"], "drift": 0.0, "degenerate": [],
            "signals": [signals(0.0, 0.5, 0.0, False), signals(0.1, 0.6, 0.0, False)]},
        3: {"version": 3, "prompts": prompts, "outputs": ["a", "c c c"], "drift": 0.2, "degenerate": [1],
            "signals": [signals(0.0, 0.5, 0.0, False), signals(0.7, 0.2, -0.4, True)]},
        5: {"version": 5, "prompts": prompts, "outputs": ["a", "c"], "drift": 0.1, "degenerate": [],
            "signals": [signals(0.0, 0.5, 0.0, False), signals(0.05, 0.55, -0.05, False)]},
    }  # fmt: skip
    text = canary_table(canaries)
    assert "Versions with degenerate canary answers: 3 (canaries 1)." in text
    assert "| 1 | 0 | 0.10 | 4 | 1.25 | 1.50 | 0.60 (+0.00) | no |" in text
    assert "| 1 | 5 | 0.05 | 4 | 1.25 | 1.50 | 0.55 (-0.05) | no |" in text
    canaries[5]["signals"][0].update(compression_ratio=None, length_ratio=None)  # an empty answer's, from Redis
    assert "| 0 | 5 | 0.00 | 4 | n/a | n/a | 0.50 (+0.00) | no |" in canary_table(canaries)
