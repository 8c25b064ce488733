"""The math demo: the math_answer extraction rule (last \\boxed{...}, else last number), the shipped
problems, and configs/math.yaml."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import pytest
import yaml

from services.common.config import BelayConfig
from services.common.prompt_data import load_prompt_data
from services.reward.math_check import extract_final_answer

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is 42.", "42"),
        ("7 + 5 = 12", "12"),
        ("First 3, then 4, so 7", "7"),
        ("It is -15", "-15"),
        ("about 3.25 metres", "3.25"),
        ("a total of 1,234 apples", "1,234"),
        ("half: 1/2", "1/2"),
        ("\\boxed{12}", "12"),
        ("so 10 and then \\boxed{ 11 } then 12", "11"),  # boxed wins over a later number
        ("\\boxed{1} no, \\boxed{2}", "2"),  # the last box
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces kept whole
        ("\\boxed{3} and \\boxed{4", "3"),  # an unclosed last box is skipped
        ("\\boxed{} but 5", "5"),  # an empty box is no answer: the last number then
        ("I don't know.", None),
        ("", None),
    ],
)
def test_final_answer_is_the_last_box_else_the_last_number(response, expected):
    assert extract_final_answer(response) == expected


def test_extraction_is_fast_on_hostile_text():
    hostile = ["\\boxed{" * 20_000, "1," * 50_000 + "x", "{" * 50_000 + "\\boxed{" + "}" * 50_000]
    started = time.monotonic()
    for text in hostile:
        extract_final_answer(text)
    assert time.monotonic() - started < 2.0


def read_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (REPO / "data" / "math" / name).read_text().splitlines()]


def test_shipped_problems_are_what_the_seeded_script_writes():
    result = subprocess.run(
        [sys.executable, "scripts/make_math_problems.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_problems_have_correct_answers_and_heldout_is_disjoint_from_train():
    train, heldout = read_rows("train.jsonl"), read_rows("heldout.jsonl")
    assert len(train) + len(heldout) >= 200 and len(heldout) >= 50
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in heldout}
    operations = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for row in train + heldout:
        words = row["prompt"].split()  # "What is A op B? Answer with the number only."
        a, operator, b = int(words[2]), words[3], int(words[4].rstrip("?"))
        assert row["answer"] == str(operations[operator](a, b)), row


def test_math_config_validates_with_math_answer():
    data = yaml.safe_load((REPO / "configs" / "math.yaml").read_text())
    config = BelayConfig.model_validate(data)
    assert config.reward.backend == "math_answer" and config.reward.answer_key == "answer"
    assert config.trainer.advantage == "group" and config.policy.samples_per_prompt >= 2
    rows = load_prompt_data(config)  # the training file, and the held-out file the run evaluates on
    assert len(rows.train) == 400 and len(rows.heldout) == 100 and config.trainer.eval_every > 0
    assert not {row.text for row in rows.heldout} & {row.text for row in rows.train}
    assert all(set(row.metadata) == {"answer"} for row in rows.train + rows.heldout)
