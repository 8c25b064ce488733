"""math_answer and format on untrusted text: a table of answers checked by math-verify in real
worker processes (a pathological one killed at its deadline), a backtracking-prone format pattern
stopped by its time limit, their settings, and format served by the real gRPC reward server."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from belay.v1 import belay_pb2
from services.common.config import ConfigError, RewardConfig, load_config
from services.reward.backends import CombinedBackend, build_backend
from services.reward.check_pool import FAILED, CheckPool
from services.reward.verifiable import FormatBackend, MathAnswerBackend

from .conftest import RPC_TIMEOUT, make_config, running_reward

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_SECONDS = 5.0  # math-verify's own default; a loaded CI machine can stretch a normal check past 2 s
PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"  # sympy evaluates the tower: it never returns

# (the row's answer, the response, the expected score)
MATH_CASES = [
    # equivalent forms
    ("12", "The answer is 12.", 1.0),
    ("12", "\\boxed{12}", 1.0),
    ("12", "12.0", 1.0),
    ("12", "\\boxed{24/2}", 1.0),
    ("12", "\\boxed{\\frac{24}{2}}", 1.0),
    ("12", "\\boxed{2 \\cdot 6}", 1.0),
    ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "so it is 0.5", 1.0),
    ("1/2", "half, 1/2", 1.0),
    ("1234", "a total of 1,234", 1.0),
    ("-3", "it drops to -3", 1.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),
    ("x+1", "\\boxed{1+x}", 1.0),
    ("7", "3 + 4 = 7", 1.0),
    ("7", "\\boxed{7} because 3 + 4 makes 7 out of 10", 1.0),  # boxed wins over the last number
    (42, "42", 1.0),  # a number in the metadata, as JSON gives it
    ("5", "\\boxed{\\text{5}}", 1.0),
    # wrong answers
    ("12", "The answer is 13.", 0.0),
    ("12", "\\boxed{13}", 0.0),
    ("3", "\\boxed{-3}", 0.0),
    ("12", "12 is close, but 11", 0.0),  # the last number counts
    ("12", "\\boxed{12} no wait \\boxed{14}", 0.0),  # the last box counts
    ("0.333", "\\boxed{\\frac{1}{3}}", 0.0),
    ("x+1", "\\boxed{x-1}", 0.0),
    ("8", "\\boxed{\\sqrt{8}}", 0.0),
    ("100", "\\boxed{10}0", 0.0),
    # no answer
    ("12", "I don't know.", 0.0),
    ("12", "", 0.0),
    ("12", "\\boxed{}", 0.0),
    ("12", "\\boxed{twelve", 0.0),
    ("12", "\\boxed{\\frac{d}{dx}}", 0.0),  # not a value
    # pathological: times out, scored 0
    ("5", PATHOLOGICAL, 0.0),
]


@pytest.fixture(scope="module")
def math_answer():
    backend = MathAnswerBackend("answer", TIMEOUT_SECONDS, workers=2)
    yield backend
    backend.close()


def test_math_answer_scores_a_table_of_answers(math_answer):
    golds, responses, expected = zip(*MATH_CASES)
    timeouts_before = math_answer.timeouts
    started = time.monotonic()
    scores = math_answer.score(["q"] * len(responses), list(responses), [{"answer": gold} for gold in golds])
    elapsed = time.monotonic() - started
    wrong = [(case, score) for case, score in zip(MATH_CASES, scores) if score != case[2]]
    assert not wrong
    assert math_answer.timeouts == timeouts_before + 1  # the pathological one, and only it
    assert elapsed < 60  # workers starting, then one check's deadline plus a worker's restart, not the tower's forever


def test_a_timed_out_worker_is_replaced_and_the_next_batch_is_scored(math_answer):
    first = math_answer.score(["q"], [PATHOLOGICAL], [{"answer": "5"}])
    then = math_answer.score(["q", "q"], ["\\boxed{5}", "6"], [{"answer": "5"}, {"answer": "5"}])
    assert first == [0.0] and then == [1.0, 0.0]


def test_math_answer_runs_outside_the_main_thread(math_answer):
    # gRPC scores in worker threads, where math-verify's own signal.alarm timeout would raise
    results = []
    thread = threading.Thread(target=lambda: results.append(math_answer.score(["q"], ["7"], [{"answer": "7"}])))
    thread.start()
    thread.join(60)
    assert results == [[1.0]]


def test_a_row_without_its_answer_is_an_error_naming_the_key(math_answer):
    with pytest.raises(ValueError, match=r"row 1: metadata has no 'answer' \(reward.answer_key"):
        math_answer.score(["q", "q"], ["1", "2"], [{"answer": "1"}, {"solution": "2"}])
    with pytest.raises(ValueError, match="math_answer needs one metadata dict per row"):
        math_answer.score(["q"], ["1"])


def test_format_stops_a_catastrophically_backtracking_pattern():
    nested = FormatBackend(r"(a+)+$", 0.5)
    started = time.monotonic()
    assert nested.score(["q"], ["a" * 40 + "!"]) == [0.0]
    assert time.monotonic() - started < 5.0
    alternation = FormatBackend(r"(a|aa)+$", 0.5)  # exponential in the regex package too: only the limit stops it
    started = time.monotonic()
    assert alternation.score(["q", "q"], ["a" * 40 + "!", "aaaa"]) == [0.0, 1.0]
    assert alternation.timeouts == 1
    assert time.monotonic() - started < 15.0  # 0.5 s of matching; wall time stretches on a loaded machine


def test_format_scores_a_reasoning_then_answer_layout():
    layout = FormatBackend(r"(?s)^<think>.+</think>\s*<answer>.+</answer>$")
    responses = ["<think>7 and 5\nmake 12</think>\n<answer>12</answer>", "12", "<answer>12</answer>"]
    assert layout.score(["q"] * 3, responses) == [1.0, 0.0, 0.0]


def test_settings_are_checked_at_start(tmp_path):
    with pytest.raises(ConfigError, match="reward: Value error, pattern is required when backend is .format."):
        load_config(environ={"BELAY_REWARD__BACKEND": "format"})
    with pytest.raises(ConfigError, match="is not a valid regular expression"):
        load_config(environ={"BELAY_REWARD__BACKEND": "format", "BELAY_REWARD__PATTERN": "(unclosed"})
    with pytest.raises(ConfigError, match="reward.check_timeout_seconds"):
        load_config(environ={"BELAY_REWARD__BACKEND": "math_answer", "BELAY_REWARD__CHECK_TIMEOUT_SECONDS": "0"})


def test_both_build_from_config_and_combine():
    section = RewardConfig.model_validate(
        {
            "backend": "combined",
            "components": [
                {"name": "correct", "backend": "math_answer", "answer_key": "solution", "check_workers": 1},
                {"name": "shape", "backend": "format", "pattern": r"^\d+$", "weight": 0.5},
            ],
        }
    )
    combined = build_backend(section, torch.device("cpu"))
    assert isinstance(combined, CombinedBackend)
    (_, _, correct), (_, _, shape) = combined.components
    try:
        assert correct.answer_key == "solution" and correct.pool.timeout_seconds == 5.0
        assert shape.score(["q", "q"], ["12", "twelve"]) == [1.0, 0.0]
        assert combined.model_id == "combined(correct*1.0+shape*0.5)"
    finally:
        correct.close()


def test_format_through_the_reward_server():
    config = make_config(reward={"backend": "format", "pattern": r"^\d+$"})
    with running_reward(config) as reward:
        reply = reward.stub.Score(
            belay_pb2.ScoreRequest(prompts=["a", "b"], responses=["12", "twelve"]), timeout=RPC_TIMEOUT
        )
    assert list(reply.scores) == [1.0, 0.0]
    assert reply.reward_model_id == "format"


def test_a_worker_left_alone_mid_check_is_ended_by_its_cpu_limit():
    # the service killed with -9 cannot kill its workers: a check that never ends must end by itself
    worker = subprocess.Popen(
        [sys.executable, "-m", "services.reward.math_check", "1"],  # 1 s of CPU per check
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    try:
        assert worker.stdout.readline() == '"ready"\n'
        worker.stdin.write(json.dumps(["5", PATHOLOGICAL[len("\\boxed{") : -1]]) + "\n")
        worker.stdin.flush()
        assert worker.wait(60) == -signal.SIGXCPU
    finally:
        worker.kill()
        worker.wait()


def test_a_worker_that_died_scores_its_check_zero_and_is_replaced():
    pool = CheckPool(1, TIMEOUT_SECONDS)
    try:
        assert pool.run([("1", "1")]) == [True]
        pool.workers[0].process.kill()  # as the kernel's out-of-memory killer would
        pool.workers[0].process.wait()
        assert pool.run([("1", "1")]) == [FAILED]
        assert pool.run([("1", "1"), ("2", "3")]) == [True, False]
    finally:
        pool.close()
