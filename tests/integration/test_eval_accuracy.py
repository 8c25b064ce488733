"""`belay eval` on held-out rows with answers (JSONL): the reward gets each row's metadata, and the
accuracy column is the share of sampled responses math_answer scores correct."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from services.common.config import BelayConfig
from services.evaluation import report
from services.evaluation.heldout import read_heldout
from services.evaluation.runner import EvalSettings, evaluate, load_heldout
from services.reward.backends import build_backend
from services.reward.verifiable import MathAnswerBackend

REPO = pathlib.Path(__file__).resolve().parents[2]
SETTINGS = EvalSettings(max_new_tokens=6, samples_per_prompt=2, seed=7)
ROWS = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 3 * 3?", "answer": 9, "level": 1}]


def write_rows(path: pathlib.Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_read_heldout_splits_prompt_from_metadata(tmp_path):
    prompts, metadata = read_heldout(write_rows(tmp_path / "rows.jsonl", ROWS))
    assert prompts == ["What is 2 + 2?", "What is 3 * 3?"]
    assert metadata == [{"answer": "4"}, {"answer": 9, "level": 1}]
    assert read_heldout(str(REPO / "prompts/heldout.txt"))[1] is None  # a text file: prompts only


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a"}', "not json"], "line 2 is not JSON"),
        (['{"question": "a"}'], "line 1: expected an object with a non-empty 'prompt' string"),
        (["[1, 2]"], "line 1: expected an object"),
        ([""], "holds no prompts"),
    ],
)
def test_read_heldout_refuses_bad_rows_naming_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_heldout(str(path))


def config_with(lm_dir, reward: dict) -> BelayConfig:
    return BelayConfig.model_validate({"reference": {"model_dir": str(lm_dir), "device": "cpu"}, "reward": reward})


def test_accuracy_is_the_math_answer_mean_and_shows_in_the_table(tiny_lm_dir, tmp_path):
    rows = write_rows(tmp_path / "heldout.jsonl", ROWS)
    config = config_with(tiny_lm_dir, {"backend": "math_answer", "check_workers": 1})
    backend = build_backend(config.reward, torch.device("cpu"))
    try:
        results = evaluate(config, [None], backend, rows, str(REPO / "data/heldout_text.txt"), SETTINGS)
        heldout = load_heldout(config, backend, rows, str(REPO / "data/heldout_text.txt"))
        samples = results["models"]["reference"]["samples"]
        # the same responses scored again, row by row, against the answers written above
        answers = {row["prompt"]: str(row["answer"]) for row in ROWS}
        again = backend.score(
            [s["prompt"] for s in samples],
            [s["response"] for s in samples],
            [{"answer": answers[s["prompt"]]} for s in samples],
        )
    finally:
        backend.close()
    reference = results["models"]["reference"]
    assert heldout.accuracy_backend is backend  # the reward is math_answer: no second pool
    assert reference["accuracy"] == reference["reward_mean"]
    assert [s["reward"] for s in samples] == again
    assert "accuracy" in report.table(results).splitlines()[0]


def test_accuracy_beside_another_reward_and_absent_without_answers(tiny_lm_dir, tmp_path):
    rows = write_rows(tmp_path / "heldout.jsonl", ROWS)
    config = config_with(tiny_lm_dir, {"backend": "format", "pattern": r"\d"})
    backend = build_backend(config.reward, torch.device("cpu"))
    heldout = load_heldout(config, backend, rows, str(REPO / "data/heldout_text.txt"))
    try:
        assert isinstance(heldout.accuracy_backend, MathAnswerBackend)
        assert heldout.accuracy_backend.score(["q"], ["\\boxed{4}"], [heldout.metadata[0]]) == [1.0]
    finally:
        heldout.accuracy_backend.close()
    without = load_heldout(config, backend, str(REPO / "prompts/heldout.txt"), str(REPO / "data/heldout_text.txt"))
    assert without.accuracy_backend is None and without.metadata is None
    results = evaluate(
        config, [None], backend, str(REPO / "prompts/heldout.txt"), str(REPO / "data/heldout_text.txt"), SETTINGS
    )
    assert "accuracy" not in results["models"]["reference"]
    assert "accuracy" not in report.table(results)
