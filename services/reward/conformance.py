"""Does a server speak belay.v1.Reward the way Belay needs? `belay check-reward ADDRESS` runs these
checks against any reward server, Belay's own or yours, and prints one line per check.

What is checked (each a CheckResult):
- grpc.health.v1 answers SERVING for "" and for belay.v1.Reward (the policy waits for it);
- Info answers with a model_id;
- Score on one ordinary pair, a batch of 16, an empty response, a ~20,000-character response and
  Unicode/emoji text, and pairs carrying per-row metadata (ScoreRequest.metadata_json, JSON objects such
  as {"answer": "Paris"}, as the actor sends a dataset's metadata columns; a server that ignores the
  field passes too): exactly one finite score per pair and a reward_model_id (every rollout records
  it); a reply with another number of scores, or a NaN/inf score, fails;
- an empty request is refused with INVALID_ARGUMENT, and so is one with more prompts than responses;
- latency: the median and the slowest of a few one-pair Score calls.
Every call has a deadline of `timeout` seconds: a server that hangs fails instead of blocking.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from belay.v1 import belay_pb2, belay_pb2_grpc

from ..common.config import GrpcConfig
from ..common.rpc import channel

SERVICE = "belay.v1.Reward"
LONG_RESPONSE = ("This is a long answer that keeps going. " * 500)[:20_000]
UNICODE_PROMPT = "Réponds en français, s'il te plaît 🙏 — 日本語もどうぞ"
METADATA_ROWS = (  # prompts, responses, metadata_json: what the actor sends with data.metadata_columns
    ["What is the capital of France?", "What is 6 * 7?", "Say hello."],
    ["Paris.", "42", "Hello!"],
    ['{"answer": "Paris", "source": {"kind": "geography", "tags": ["easy"]}}', '{"answer": 42, "tests": null}', ""],
)
UNICODE_RESPONSE = "Bien sûr ! 😀🎉 Voilà: ça marche. 日本語のテキストです。 Ελληνικά, русский, עברית, 👩‍👩‍👧‍👦"


@dataclasses.dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


def _rpc_problem(error: grpc.RpcError, timeout: float, what: str) -> str:
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"{what} gave no answer within {timeout:g} s (DEADLINE_EXCEEDED): it hangs or is too slow; "
            "the policy gives up after policy.reward_timeout_seconds"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"{what} failed with UNAVAILABLE ({details}): the connection was refused or broke; "
            "is the server running there, or did it crash while answering?"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{what} is not implemented by this server (UNIMPLEMENTED): implement it"
    return f"{what} failed with {code.name}: {details}"


class _Checker:
    def __init__(self, address: str, timeout: float, grpc_config: GrpcConfig):
        self.address = address
        self.timeout = timeout
        self.channel = channel(address, grpc_config)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.reward = belay_pb2_grpc.RewardStub(self.channel)
        self.results: list[CheckResult] = []
        self.gone = ""  # set once the server stopped answering: later checks are not run

    def failed_call(self, name: str, error: grpc.RpcError, what: str) -> None:
        self.add(name, False, _rpc_problem(error, self.timeout, what))
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            try:
                self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=min(self.timeout, 2.0))
            except grpc.RpcError as probe:
                if probe.code() == grpc.StatusCode.UNAVAILABLE:
                    self.gone = name

    def skipped(self, name: str) -> bool:
        if self.gone:
            self.add(name, False, f"not run: the server stopped answering during '{self.gone}'")
        return bool(self.gone)

    def add(self, name: str, passed: bool, detail: str) -> bool:
        self.results.append(CheckResult(name, passed, detail))
        return passed

    def health_check(self, service: str) -> bool | None:
        """True/False for a pass/fail; None when nothing answers at the address (the other checks are moot)."""
        name = f"health {service or '(server)'!s}"
        try:
            status = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout).status
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self.add(
                    name,
                    False,
                    f"nothing answers at {self.address} ({error.code().name}: "
                    f"{error.details()}): is the server running and listening on that address?",
                )
                return None
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                return self.add(
                    name,
                    False,
                    "the server does not serve grpc.health.v1; add "
                    "grpc_health.v1.health.HealthServicer (see examples/reward_server)",
                )
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return self.add(
                    name,
                    False,
                    f"health knows no service {service!r}: set it to SERVING once the reward model is loaded",
                )
            return self.add(name, False, _rpc_problem(error, self.timeout, "Health.Check"))
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        if status != health_pb2.HealthCheckResponse.SERVING:
            return self.add(name, False, f"health says {status_name}; it must say SERVING once the server can score")
        return self.add(name, True, "SERVING")

    def info(self) -> None:
        try:
            info = self.reward.Info(belay_pb2.InfoRequest(), timeout=self.timeout)
        except grpc.RpcError as error:
            self.failed_call("info", error, "Info")
            return
        if not info.model_id:
            self.add("info", False, "Info answered with an empty model_id: name the reward model you serve")
            return
        extra = f", revision {info.model_revision}" if info.model_revision else ""
        service = "" if info.service == "reward" else f" (service is {info.service!r}; Belay's say 'reward')"
        self.add("info", True, f"model_id {info.model_id}{extra}{service}")

    def score(self, name: str, prompts: list[str], responses: list[str], metadata_json=()) -> float | None:
        """One Score check; returns the seconds it took when it passed."""
        if self.skipped(name):
            return None
        start = time.perf_counter()
        try:
            reply = self.reward.Score(
                belay_pb2.ScoreRequest(prompts=prompts, responses=responses, metadata_json=metadata_json),
                timeout=self.timeout,
            )
        except grpc.RpcError as error:
            self.failed_call(name, error, "Score")
            return None
        seconds = time.perf_counter() - start
        scores, count = list(reply.scores), len(responses)
        if len(scores) != count:
            self.add(
                name,
                False,
                f"asked for {count} scores, got {len(scores)}: Score must return exactly one "
                "score per (prompt, response) pair, in order",
            )
            return None
        bad = [(index, value) for index, value in enumerate(scores) if not math.isfinite(value)]
        if bad:
            index, value = bad[0]
            self.add(
                name,
                False,
                f"{len(bad)} of {count} scores are not finite (first: index {index} = {value}); "
                "NaN or infinite rewards break training: return finite numbers",
            )
            return None
        if not reply.reward_model_id:
            self.add(
                name,
                False,
                "the reply has an empty reward_model_id; every rollout records it, so set it (e.g. to Info's model_id)",
            )
            return None
        shown = ", ".join(f"{value:.4g}" for value in scores[:4]) + (", ..." if count > 4 else "")
        self.add(name, True, f"{count} finite score{'s' if count > 1 else ''} [{shown}] in {seconds * 1000:.0f} ms")
        return seconds

    def refused(self, name: str, prompts: list[str], responses: list[str], why: str) -> None:
        if self.skipped(name):
            return
        try:
            reply = self.reward.Score(
                belay_pb2.ScoreRequest(prompts=prompts, responses=responses), timeout=self.timeout
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                self.add(name, True, f"refused with INVALID_ARGUMENT ({error.details()})")
            elif error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                self.failed_call(name, error, "Score")
            else:
                self.add(
                    name,
                    False,
                    f"refused with {error.code().name} ({error.details()}); {why} must be "
                    "refused with INVALID_ARGUMENT",
                )
            return
        self.add(
            name,
            False,
            f"answered ({len(reply.scores)} scores) instead of refusing: {why} must be refused with INVALID_ARGUMENT",
        )

    def latency(self, calls: int) -> None:
        if self.skipped("latency"):
            return
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            try:
                self.reward.Score(
                    belay_pb2.ScoreRequest(prompts=["How was your day?"], responses=["It was a good day."]),
                    timeout=self.timeout,
                )
            except grpc.RpcError as error:
                self.failed_call("latency", error, "Score")
                return
            times.append(time.perf_counter() - start)
        self.add(
            "latency",
            True,
            f"median {statistics.median(times) * 1000:.1f} ms, slowest "
            f"{max(times) * 1000:.1f} ms over {calls} one-pair Score calls",
        )


def check_reward_server(
    address: str, timeout: float = 10.0, grpc_config: GrpcConfig | None = None, latency_calls: int = 5
) -> list[CheckResult]:
    """Run every check against the server at `address`; one CheckResult each, in order. Stops after
    the first check when nothing answers at the address."""
    checker = _Checker(address, timeout, grpc_config or GrpcConfig())
    try:
        if checker.health_check("") is None:
            return checker.results
        checker.health_check(SERVICE)
        checker.info()
        checker.score("score one pair", ["What is the capital of France?"], ["The capital of France is Paris."])
        checker.score(
            "score a batch of 16",
            [f"Prompt number {i}." for i in range(16)],
            [f"Response number {i}, {'good' if i % 2 else 'bad'}." for i in range(16)],
        )
        checker.score("score an empty response", ["Say something."], [""])
        checker.score(f"score a long response ({len(LONG_RESPONSE)} chars)", ["Write at length."], [LONG_RESPONSE])
        checker.score("score Unicode and emoji", [UNICODE_PROMPT], [UNICODE_RESPONSE])
        checker.score("score with per-row metadata", *METADATA_ROWS)
        checker.refused("refuse an empty request", [], [], "a request with no pairs")
        checker.refused(
            "refuse mismatched prompts and responses",
            ["a", "b"],
            ["c"],
            "a request whose prompts and responses differ in number",
        )
        checker.latency(latency_calls)
    finally:
        checker.channel.close()
    return checker.results


def verdict(results: list[CheckResult]) -> str:
    failed = [result.name for result in results if not result.passed]
    if not failed:
        return f"PASS: all {len(results)} checks passed"
    return f"FAIL: {len(failed)} of {len(results)} checks failed ({', '.join(failed)})"
