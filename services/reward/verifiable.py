"""Verifiable, rule-based rewards (the math and code workloads of TRL GRPO, OpenRLHF, veRL):

- `math_answer`: 1.0 when the response's final answer (its last \\boxed{...}, else its last number)
  equals the row's answer, metadata[answer_key], by math-verify's symbolic and numeric equivalence;
  0.0 when it differs, when there is no answer, or when the check overruns `check_timeout_seconds`
  (each check runs in a worker process that is killed then: check_pool.py says why);
- `format`: 1.0 when the regular expression `pattern` is found in the response (anchor it with
  ^...$ to require the whole response; (?s) lets . cross lines), else 0.0. Matched by the `regex`
  package with a time limit, so a pattern prone to catastrophic backtracking on hostile text
  scores 0 after `check_timeout_seconds` instead of hanging the service.

Both are scored on untrusted model output, and both fit under `combined`.
"""

from __future__ import annotations

import hashlib
import logging
from importlib.metadata import version

import regex

from .check_pool import CheckPool
from .math_check import extract_final_answer

log = logging.getLogger(__name__)


def check_metadata(metadata: list[dict] | None, count: int, key: str) -> list[str]:
    """Each row's metadata[key] as text; ValueError naming the key and row when one lacks it."""
    if metadata is None or len(metadata) != count:
        got = "none" if metadata is None else f"{len(metadata)} rows"
        raise ValueError(
            f"math_answer needs one metadata dict per row with the answer under {key!r} "
            f"(reward.answer_key); got {got} for {count} responses"
        )
    answers = []
    for row, fields in enumerate(metadata):
        if key not in fields or fields[key] is None or str(fields[key]).strip() == "":
            raise ValueError(
                f"row {row}: metadata has no {key!r} (reward.answer_key; its keys: {sorted(fields)}): "
                "each prompt needs its answer in that column"
            )
        answers.append(str(fields[key]).strip())
    return answers


class MathAnswerBackend:
    def __init__(self, answer_key: str = "answer", timeout_seconds: float = 5.0, workers: int = 2):
        self.answer_key = answer_key
        self.pool = CheckPool(workers, timeout_seconds)
        self.model_id = "math_answer"
        self.revision = f"math-verify-{version('math-verify')}"

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
        golds = check_metadata(metadata, len(responses), self.answer_key)
        answers = [extract_final_answer(response) for response in responses]
        rows = [row for row, answer in enumerate(answers) if answer is not None]
        outcomes = self.pool.run([(golds[row], answers[row]) for row in rows])
        scores = [0.0] * len(responses)
        for row, outcome in zip(rows, outcomes):
            scores[row] = 1.0 if outcome is True else 0.0
        return scores

    @property
    def timeouts(self) -> int:
        """Checks that overran their time limit (scored 0) since the backend started."""
        return self.pool.timeouts

    def close(self) -> None:
        self.pool.close()


class FormatBackend:
    def __init__(self, pattern: str, timeout_seconds: float = 5.0):
        try:
            self.pattern = regex.compile(pattern)
        except regex.error as error:
            raise ValueError(f"reward.pattern {pattern!r} is not a valid regular expression: {error}") from None
        self.timeout_seconds = timeout_seconds
        self.timeouts = 0
        self.model_id = "format"
        self.revision = hashlib.sha256(pattern.encode()).hexdigest()[:16]

    def matches(self, response: str) -> bool:
        try:
            return self.pattern.search(response, timeout=self.timeout_seconds) is not None
        except TimeoutError:
            self.timeouts += 1
            log.warning(
                "format: pattern %.80r overran %g s on a response of %d characters: scored 0",
                self.pattern.pattern,
                self.timeout_seconds,
                len(response),
            )
            return False

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
        return [1.0 if self.matches(response) else 0.0 for response in responses]
