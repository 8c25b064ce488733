"""The held-out evaluation's figures against their formulas, where accuracy is read, and the choice of
the best persisted version (services/policy/heldout_eval.py, services/trainer/best_version.py)."""

from __future__ import annotations

import json

import pytest

from services.common.checkpoints import committed_versions, prune_checkpoints, write_checkpoint
from services.common.config import load_config
from services.policy.heldout_eval import accuracy, accuracy_components, eval_figures
from services.trainer.best_version import BEST_FILE, best_of, marked_versions, read_best, write_best


def test_figures_follow_their_formulas():
    rewards = [1.0, 0.0, 0.5, 1.0]
    policy = [[-1.0, -2.0], [-0.5], [-3.0, -1.0, -1.0], [-2.0]]
    reference = [[-1.5, -2.5], [-0.25], [-3.0, -2.0, -1.0], [-1.0]]
    figures = eval_figures(rewards, [{}] * 4, policy, reference, None)
    mean = sum(rewards) / 4
    assert figures["reward_mean"] == pytest.approx(mean)
    assert figures["reward_std"] == pytest.approx((sum((r - mean) ** 2 for r in rewards) / 4) ** 0.5)
    # k1 per answer: Σ log π − Σ log π_ref = 1.0, -0.25, 1.0, -1.0
    assert figures["kl_per_sequence"] == pytest.approx((1.0 - 0.25 + 1.0 - 1.0) / 4)
    assert figures["response_length"] == pytest.approx((2 + 1 + 3 + 1) / 4)
    assert figures["rows"] == 4 and figures["accuracy"] is None


def test_accuracy_is_the_share_math_answer_scores_correct():
    assert accuracy([1.0, 0.0, 1.0, 0.0], [], []) == 0.5  # reward.backend math_answer: the total
    components = [{"correct": 1.0, "format": 0.0}, {"correct": 0.0, "format": 1.0}, {"correct": 1.0, "format": 1.0}]
    assert accuracy([1.0, 1.0, 2.0], components, ["correct"]) == pytest.approx(2 / 3)
    assert accuracy([0.3, 0.9], [{}, {}], None) is None  # no answer checker: no accuracy


def test_accuracy_is_read_from_math_answer_alone_or_its_components():
    assert accuracy_components(load_config(None, environ={"BELAY_REWARD__BACKEND": "math_answer"}).reward) == []
    assert accuracy_components(load_config(None, environ={}).reward) is None  # vader
    combined = load_config(
        None,
        environ={
            "BELAY_REWARD__BACKEND": "combined",
            "BELAY_REWARD__COMPONENTS": json.dumps(
                [{"name": "right", "backend": "math_answer"}, {"name": "tidy", "backend": "format", "pattern": "x"}]
            ),
        },
    ).reward
    assert accuracy_components(combined) == ["right"]


def test_the_best_is_the_highest_figure_among_persisted_versions_older_on_a_tie():
    evals = {0: {"reward_mean": 0.1}, 2: {"reward_mean": 0.7}, 4: {"reward_mean": 0.9}, 6: {"reward_mean": 0.7}}
    assert best_of(evals, {0, 2, 6}, "reward_mean") == (2, 0.7)  # 4 is not persisted; 2 and 6 tie
    assert best_of(evals, {0, 2, 4, 6}, "reward_mean") == (4, 0.9)
    assert best_of({2: {"accuracy": None}, 4: {"accuracy": float("nan")}}, {2, 4}, "accuracy") is None
    assert best_of(evals, set(), "reward_mean") is None


def test_pruning_keeps_the_marked_best_version(tmp_path):
    for version in range(1, 7):
        write_checkpoint(tmp_path, version, lambda directory: (directory / "w.txt").write_text("x"))
    write_best(tmp_path, {"version": 2, "metric": "reward_mean", "value": 1.0, "path": "p"})
    assert read_best(tmp_path)["version"] == 2 and marked_versions(tmp_path) == {2}
    prune_checkpoints(tmp_path, 3, protect=marked_versions(tmp_path))
    assert [v for v, _ in committed_versions(tmp_path)] == [2, 4, 5, 6]
    (tmp_path / BEST_FILE).write_text("{not json")
    assert read_best(tmp_path) is None and marked_versions(tmp_path) == set()
