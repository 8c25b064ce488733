"""`belay check-reward`: passes against every built-in backend served for real and against the
example reward service running as its own process; fails, saying why, against servers that break
the protocol (wrong number of scores, NaN, a Score that hangs, a server that dies mid-request, no
server at all)."""

from __future__ import annotations

import contextlib
import math
import pathlib
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from belay.v1 import belay_pb2, belay_pb2_grpc
from services import cli
from services.common.config import GrpcConfig
from services.common.rpc import channel, wait_until_serving
from services.reward.conformance import check_reward_server, verdict
from tests.conftest import free_port

from .conftest import make_config, running_reward
from .test_reward_backends import RewardHTTPServer

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "reward_server" / "server.py"
OVERRIDE = REPO / "deploy" / "compose" / "reward-example.override.yml"


def run_cli(address: str, *extra: str, capsys) -> tuple[int, str]:
    code = cli.main(["check-reward", address, *extra])
    return code, capsys.readouterr().out


def assert_all_pass(address: str, capsys, timeout: float = 20.0) -> str:
    code, out = run_cli(address, "--timeout", str(timeout), capsys=capsys)
    assert code == 0, out
    lines = out.strip().splitlines()
    checks = [line for line in lines if line.startswith(("PASS  ", "FAIL  "))]
    assert len(checks) == 12 and all(line.startswith("PASS  ") for line in checks), out
    assert lines[-1] == "PASS: all 12 checks passed"
    assert "latency: median" in out
    assert "PASS  score with per-row metadata: 3 finite scores" in out
    return out


# --- every built-in backend passes ---


@pytest.mark.parametrize("backend", ["vader", "hf_classifier", "embedding_similarity", "python", "http", "combined"])
def test_check_reward_passes_against_each_built_in_backend(backend, tiny_reward_dir, capsys):
    with RewardHTTPServer() as http_server:
        sections = {
            "vader": {"backend": "vader"},
            "hf_classifier": {"backend": "hf_classifier", "model_dir": str(tiny_reward_dir), "batch_size": 4},
            "embedding_similarity": {"backend": "embedding_similarity", "targets": ["A clear and polite answer."]},
            "python": {"backend": "python", "function": "tests.integration.test_reward_backends:length_reward"},
            "http": {"backend": "http", "url": http_server.url + "/ok"},
            "combined": {
                "backend": "combined",
                "components": [
                    {"name": "vader", "backend": "vader", "weight": 1.0},
                    {
                        "name": "length",
                        "backend": "python",
                        "weight": 0.01,
                        "function": "tests.integration.test_reward_backends:length_reward",
                    },
                ],
            },
        }
        with running_reward(make_config(reward=sections[backend])) as running:
            out = assert_all_pass(running.address, capsys)
            model_id = running.servicer.backend.model_id
    assert f"PASS  info: model_id {model_id}" in out


# --- the example service, as a real process ---


@contextlib.contextmanager
def process(*command: str, ready_address: str | None = None):
    """A real child process; with ready_address, waits until its health says SERVING."""
    child = subprocess.Popen([*command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if ready_address is not None:
            chan = channel(ready_address, GrpcConfig())
            try:
                wait_until_serving(chan, "belay.v1.Reward", 30.0)
            except TimeoutError:
                child.kill()
                raise AssertionError(f"{command} never served: {child.communicate()[0]}") from None
            finally:
                chan.close()
        yield child
    finally:
        if child.poll() is None:
            child.terminate()
            child.wait(10)


def test_check_reward_passes_against_the_example_service_in_its_own_process():
    address = f"127.0.0.1:{free_port()}"
    with process(sys.executable, str(EXAMPLE), "--address", address, ready_address=address):
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "check-reward", address, "--timeout", "10"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  info: model_id example-ends-with-full-stop" in result.stdout
    assert "PASS  score a batch of 16: 16 finite scores" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "PASS: all 12 checks passed"
    assert len(EXAMPLE.read_text().splitlines()) < 60


def test_the_example_scores_responses_that_end_with_a_full_stop():
    address = f"127.0.0.1:{free_port()}"
    with process(sys.executable, str(EXAMPLE), "--address", address, ready_address=address):
        chan = channel(address, GrpcConfig())
        reply = belay_pb2_grpc.RewardStub(chan).Score(
            belay_pb2.ScoreRequest(
                prompts=["a", "b", "c"], responses=["It ends here.", "No stop", "Trailing space.  "]
            ),
            timeout=10,
        )
        chan.close()
    assert list(reply.scores) == [1.0, 0.0, 1.0]


def test_compose_override_swaps_the_reward_service_for_the_example():
    override = yaml.safe_load(OVERRIDE.read_text())
    reward = override["services"]["reward"]
    assert set(override["services"]) == {"reward"}
    command = reward["command"]
    assert command[0] == "python" and (REPO / command[1]) == EXAMPLE and EXAMPLE.is_file()
    assert "--address" in command and command[command.index("--address") + 1].endswith(":50053")
    assert reward["build"]["context"] == "."
    assert (REPO / reward["build"]["dockerfile"]).is_file()
    dockerfile = (REPO / reward["build"]["dockerfile"]).read_text()
    assert "COPY examples/reward_server/" in dockerfile and "COPY gen/" in dockerfile
    assert (
        "docker compose -f docker-compose.yml -f deploy/compose/reward-example.override.yml up" in OVERRIDE.read_text()
    )


# --- broken servers fail, with the reason ---


class BrokenReward(belay_pb2_grpc.RewardServicer):
    def __init__(self, score):
        self.score = score

    def Score(self, request, context):
        if not request.responses:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty")
        return belay_pb2.ScoreResponse(scores=self.score(list(request.responses)), reward_model_id="broken")

    def Info(self, request, context):
        return belay_pb2.InfoResponse(service="reward", model_id="broken")


@contextlib.contextmanager
def broken_server(score, with_health: bool = True):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    belay_pb2_grpc.add_RewardServicer_to_server(BrokenReward(score), server)
    if with_health:
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", "belay.v1.Reward"):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def failures(out: str) -> dict[str, str]:
    """check name -> reason, for every FAIL line."""
    return dict(line[len("FAIL  ") :].split(": ", 1) for line in out.splitlines() if line.startswith("FAIL  "))


def test_a_server_returning_one_score_too_many_fails(capsys):
    with broken_server(lambda responses: [0.5] * (len(responses) + 1)) as address:
        code, out = run_cli(address, "--timeout", "5", capsys=capsys)
    assert code == 1
    failed = failures(out)
    assert failed["score one pair"].startswith("asked for 1 scores, got 2: Score must return exactly one score")
    assert "asked for 16 scores, got 17" in failed["score a batch of 16"]
    assert "asked for 3 scores, got 4" in failed["score with per-row metadata"]
    assert "PASS  info: model_id broken" in out and "PASS  refuse an empty request" in out
    assert failed["refuse mismatched prompts and responses"].startswith("answered (2 scores) instead of refusing")
    assert out.strip().splitlines()[-1].startswith("FAIL: 7 of 12 checks failed (score one pair, ")


def test_a_server_returning_nan_fails(capsys):
    with broken_server(lambda responses: [0.1] * (len(responses) - 1) + [math.nan]) as address:
        code, out = run_cli(address, "--timeout", "5", capsys=capsys)
    assert code == 1
    failed = failures(out)
    assert failed["score one pair"] == (
        "1 of 1 scores are not finite (first: index 0 = nan); NaN or infinite "
        "rewards break training: return finite numbers"
    )
    assert failed["score a batch of 16"].startswith("1 of 16 scores are not finite (first: index 15 = nan)")


def test_a_server_whose_score_hangs_past_the_deadline_fails(capsys):
    release = threading.Event()

    def hang(responses):
        release.wait(30)
        return [0.0] * len(responses)

    with broken_server(hang) as address:
        start = time.monotonic()
        try:
            code, out = run_cli(address, "--timeout", "0.5", capsys=capsys)
        finally:
            release.set()
    assert code == 1 and time.monotonic() - start < 20
    failed = failures(out)
    assert failed["score one pair"].startswith("Score gave no answer within 0.5 s (DEADLINE_EXCEEDED): it hangs")
    assert "latency" in failed and "PASS  health (server): SERVING" in out


CRASHING_SERVER = """
import os, sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
sys.path.insert(0, {gen!r})
from belay.v1 import belay_pb2, belay_pb2_grpc

class Crashing(belay_pb2_grpc.RewardServicer):
    def Score(self, request, context):
        os._exit(3)  # dies in the middle of answering
    def Info(self, request, context):
        return belay_pb2.InfoResponse(service="reward", model_id="crashing")

server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
belay_pb2_grpc.add_RewardServicer_to_server(Crashing(), server)
status = health.HealthServicer()
health_pb2_grpc.add_HealthServicer_to_server(status, server)
for name in ("", "belay.v1.Reward"):
    status.set(name, health_pb2.HealthCheckResponse.SERVING)
server.add_insecure_port(sys.argv[1])
server.start()
server.wait_for_termination()
"""


def test_a_server_that_crashes_mid_request_fails(tmp_path, capsys):
    script = tmp_path / "crashing_server.py"
    script.write_text(CRASHING_SERVER.format(gen=str(REPO / "gen")))
    address = f"127.0.0.1:{free_port()}"
    with process(sys.executable, str(script), address, ready_address=address) as child:
        code, out = run_cli(address, "--timeout", "5", capsys=capsys)
        assert child.wait(10) == 3  # it really died in Score
    assert code == 1
    failed = failures(out)
    assert "PASS  info: model_id crashing" in out
    assert "UNAVAILABLE" in failed["score one pair"] and "did it crash while answering?" in failed["score one pair"]
    assert failed["latency"] == "not run: the server stopped answering during 'score one pair'"


def test_no_server_at_the_address_fails_at_once_saying_so(capsys):
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    code, out = run_cli(address, "--timeout", "5", capsys=capsys)
    assert code == 1 and time.monotonic() - start < 5
    assert failures(out) == {"health (server)": failures(out)["health (server)"]}
    assert f"nothing answers at {address}" in out and "is the server running and listening on that address?" in out
    assert out.strip().splitlines()[-1] == "FAIL: 1 of 1 checks failed (health (server))"


def test_a_server_without_health_or_refusals_fails_naming_what_to_add():
    def accept_anything(responses):
        return [1.0] * len(responses)

    class Lenient(BrokenReward):
        def Score(self, request, context):  # answers an empty request instead of refusing it
            return belay_pb2.ScoreResponse(scores=[1.0] * len(request.responses), reward_model_id="")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    belay_pb2_grpc.add_RewardServicer_to_server(Lenient(accept_anything), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        results = check_reward_server(f"127.0.0.1:{port}", timeout=5, latency_calls=2)
    finally:
        server.stop(0)
    by_name = {result.name: result for result in results}
    assert "does not serve grpc.health.v1" in by_name["health (server)"].detail
    assert "empty reward_model_id" in by_name["score one pair"].detail
    assert by_name["refuse an empty request"].detail.startswith("answered (0 scores) instead of refusing")
    assert by_name["latency"].passed
    assert verdict(results).startswith("FAIL: ")
