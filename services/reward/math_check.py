"""The math_answer check itself: the final answer pulled out of a response, and math-verify's
verdict on it against the row's answer. Both run on untrusted model output.

extract_final_answer runs in the reward service (it is linear in the text: a brace scanner and a
regular expression without nested quantifiers); answers_match runs in a worker process of
check_pool.CheckPool (`python -m services.reward.math_check`, serve_checks below), which is
killed when it overruns, because sympy can take forever on an answer like 9^{9^{9^{9}}}.
math-verify's own timeouts (signal.alarm, main thread only) are off.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys

BOXED = "\\boxed{"
BRACES = re.compile(r"\\boxed\{|[{}]")
# A number: optional sign, digits with optional thousands commas, optional decimals, optional /denominator.
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """The contents of the \\boxed{...} whose closing brace comes last in text, or None. One pass
    over the braces (linear: hostile text with thousands of unclosed boxes cannot slow it)."""
    opened: list[int | None] = []  # per open brace: where a box's contents start, None for a plain brace
    last = None
    for token in BRACES.finditer(text):
        if token.group() == "}":
            start = opened.pop() if opened else None
            if start is not None:
                last = (start, token.start())
        else:
            opened.append(token.end() if token.group() == BOXED else None)
    return None if last is None else text[last[0] : last[1]].strip()


def extract_final_answer(response: str) -> str | None:
    """The response's final answer: the last \\boxed{...} if it has one, else its last number
    ("1,234" and "3/4" count as one number), else None (no answer: scored 0)."""
    boxed = last_boxed(response)
    if boxed:
        return boxed
    numbers = NUMBER.findall(response)
    return numbers[-1] if numbers else None


def answers_match(gold: str, answer: str) -> bool:
    """math-verify's symbolic and numeric equivalence of answer to gold, both read as LaTeX
    (a plain number is LaTeX too). Unbounded in time: call it in a CheckPool worker."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    extraction = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(BOXED + gold + "}", extraction, parsing_timeout=None)
    answer_parsed = parse(BOXED + answer + "}", extraction, parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def limit_cpu_seconds(seconds: int) -> None:
    """Let the kernel end this worker (SIGXCPU) once it has spent `seconds` more CPU time: the
    backstop when the service died mid-check and no one is left to kill a check that never ends."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def serve_checks(cpu_seconds: int) -> None:
    """A CheckPool worker: warm up (import sympy, one check), say "ready", then answer each JSON
    [gold, answer] line on stdin with a JSON true/false line, each check allowed `cpu_seconds` of
    CPU. stdout is kept for these replies alone: anything a library prints goes to stderr. It ends
    when stdin does (the pool closed, or the service is gone)."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its timeouts are off: ours are on
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    answers_match("1", "1")
    replies.write('"ready"\n')
    replies.flush()
    for line in sys.stdin:
        gold, answer = json.loads(line)
        limit_cpu_seconds(cpu_seconds)
        try:
            verdict = answers_match(gold, answer)
        except Exception:  # noqa: BLE001 - any error on untrusted text is a wrong answer
            verdict = False
        replies.write(json.dumps(verdict) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve_checks(int(sys.argv[1]))
