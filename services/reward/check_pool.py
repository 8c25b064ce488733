"""A small pool of worker processes that runs math_check.answers_match with a deadline per check.

Why processes: a check on hostile text can run forever in sympy, and the only safe way to stop
Python code that does not return is to kill its process. math-verify's own timeout uses
signal.alarm, which works in the main thread only, and the reward service scores in gRPC threads.
Each worker is a fresh interpreter, `python -m services.reward.math_check` (not multiprocessing:
that would re-run a user's unguarded main script in every worker), reading JSON lines on stdin and
answering JSON lines on stdout, never pickles. A worker that overruns `timeout_seconds` is killed
and replaced; its check counts as timed out. Each worker also caps its own CPU time per check
(RLIMIT_CPU, the timeout + 10 s), so one orphaned mid-check by a killed service still ends.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait

log = logging.getLogger(__name__)
TIMED_OUT = "timeout"  # a task's outcome when its worker overran the deadline
FAILED = "failed"  # ... when its worker died (out of memory, a crash)
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]  # holds the services package the workers import


@dataclasses.dataclass
class Worker:
    process: subprocess.Popen
    deadline: float  # while starting: the start-up deadline; while busy: the check's deadline
    ready: bool = False
    task: int | None = None  # index of the check it runs


class CheckPool:
    """`workers` processes; run(tasks) returns, per (gold, answer), True, False, TIMED_OUT or FAILED."""

    def __init__(self, workers: int, timeout_seconds: float, startup_timeout_seconds: float = 120.0):
        if workers < 1 or timeout_seconds <= 0:
            raise ValueError(f"CheckPool: need workers >= 1, timeout_seconds > 0 (got {workers}, {timeout_seconds})")
        self.timeout_seconds = timeout_seconds
        self.startup_timeout_seconds = startup_timeout_seconds
        self.lock = threading.Lock()  # gRPC serves Score from several threads: one batch at a time
        self.timeouts = 0  # checks that overran, since the pool started
        self.workers = [self._start() for _ in range(workers)]
        atexit.register(self.close)

    def _start(self) -> Worker:
        paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        process = subprocess.Popen(
            [sys.executable, "-m", "services.reward.math_check", str(math.ceil(self.timeout_seconds) + 10)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environment,
            text=True,
        )
        return Worker(process, time.monotonic() + self.startup_timeout_seconds)

    def _replace(self, worker: Worker) -> None:
        stop(worker.process)
        self.workers[self.workers.index(worker)] = self._start()

    def run(self, tasks: list[tuple[str, str]]) -> list:
        with self.lock:
            outcomes: list = [None] * len(tasks)
            pending = list(range(len(tasks)))[::-1]  # popped from the end: first task first
            remaining = len(tasks)
            while remaining:
                for worker in self.workers:
                    if worker.ready and worker.task is None and pending:
                        self._assign(worker, pending.pop(), tasks)
                waiting = [worker for worker in self.workers if not worker.ready or worker.task is not None]
                timeout = max(0.0, min(worker.deadline for worker in waiting) - time.monotonic())
                answered = wait([worker.process.stdout for worker in waiting], timeout)
                for worker in waiting:
                    if worker.process.stdout in answered:
                        remaining -= self._receive(worker, tasks, outcomes)
                    elif time.monotonic() >= worker.deadline:
                        remaining -= self._overran(worker, tasks, outcomes)
            return outcomes

    def _assign(self, worker: Worker, index: int, tasks: list) -> None:
        worker.task, worker.deadline = index, time.monotonic() + self.timeout_seconds
        try:
            worker.process.stdin.write(json.dumps(tasks[index]) + "\n")
            worker.process.stdin.flush()
        except BrokenPipeError:  # it died: its stdout ends, and _receive replaces it
            pass

    def _receive(self, worker: Worker, tasks: list, outcomes: list) -> int:
        """Read one message from worker; the number of tasks it finished (0 or 1)."""
        line = worker.process.stdout.readline()  # one whole line: the worker writes one, then waits
        if not line:
            code = worker.process.wait()
            if not worker.ready:
                raise RuntimeError(
                    f"a math_answer check worker exited while starting (exit code {code}; its error is "
                    "in this service's log): is math-verify installed? (pip install -r requirements.txt)"
                )
            log.warning("a math_answer check worker died (exit code %s): scored 0", code)
            outcomes[worker.task] = FAILED
            self._replace(worker)
            return 1
        if not worker.ready:
            worker.ready = True
            return 0
        outcomes[worker.task], worker.task = json.loads(line) is True, None
        return 1

    def _overran(self, worker: Worker, tasks: list, outcomes: list) -> int:
        if not worker.ready:
            raise RuntimeError(f"a math_answer check worker did not start within {self.startup_timeout_seconds:g} s")
        self.timeouts += 1
        gold, answer = tasks[worker.task]
        log.warning(
            "math_answer check timed out after %g s (answer %.80r, expected %.40r): scored 0; %d timeouts so far",
            self.timeout_seconds,
            answer,
            gold,
            self.timeouts,
        )
        outcomes[worker.task] = TIMED_OUT
        self._replace(worker)
        return 1

    def close(self) -> None:
        atexit.unregister(self.close)
        for worker in self.workers:
            stop(worker.process)
        self.workers = []


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(5)
    for stream in (process.stdin, process.stdout):
        try:
            stream.close()
        except BrokenPipeError:  # a check written to a dead worker, still buffered: nothing to deliver
            pass
