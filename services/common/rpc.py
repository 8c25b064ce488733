"""gRPC plumbing every service shares: a server with health and reflection, SIGTERM handling,
client channels with message limits and retries, and request validation errors."""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from belay.v1 import belay_pb2

from .config import GrpcConfig

log = logging.getLogger(__name__)

# Retries on UNAVAILABLE only, for our methods, which are all idempotent (no state changes
# on a repeated Generate, LogProbs, Score, Info; UpdateWeights to the same version is a no-op).
RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "belay.v1.Policy"}, {"service": "belay.v1.Reference"},
                 {"service": "belay.v1.Reward"}],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "3s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]
})


def message_options(config: GrpcConfig) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes)]


class RequestError(Exception):
    """A request the servicer refuses; carries the gRPC status code and a message a person can act on."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def too_big(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def handle(context: grpc.ServicerContext, method, request):
    """Run a servicer body; map RequestError to its status and anything else to INTERNAL with its text."""
    try:
        return method(request)
    except RequestError as error:
        context.abort(error.code, str(error))
    except Exception as error:  # keep serving; say what went wrong
        log.exception("request failed")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class ServiceServer:
    """A grpc.Server with health (NOT_SERVING until mark_serving) and optional reflection."""

    def __init__(self, address: str, config: GrpcConfig, service_names: list[str]):
        self.config = config
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers),
                                  options=message_options(config))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = ["", *service_names]
        for name in self.service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if config.reflection:
            reflection.enable_server_reflection(
                [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.address = address.rsplit(":", 1)[0] + f":{self.port}"
        self._stopped = threading.Event()

    def start(self) -> None:
        self.server.start()

    def mark_serving(self) -> None:
        for name in self.service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self) -> None:
        """NOT_SERVING first, then let in-flight calls finish within the grace."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for name in self.service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(self.config.shutdown_grace_seconds).wait()

    def stop_on_signals(self, on_stop=None) -> None:
        def _handler(signum, _frame):
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            if on_stop is not None:
                on_stop()
            threading.Thread(target=self.stop, daemon=True).start()
        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    def wait(self) -> None:
        self.server.wait_for_termination()


def channel(address: str, config: GrpcConfig) -> grpc.Channel:
    options = [*message_options(config), ("grpc.enable_retries", 1),
               ("grpc.service_config", RETRY_SERVICE_CONFIG)]
    return grpc.insecure_channel(address, options=options)


def wait_until_serving(chan: grpc.Channel, service: str, timeout_seconds: float) -> None:
    """Poll grpc.health.v1 until SERVING; TimeoutError names the service and address otherwise."""
    stub = health_pb2_grpc.HealthStub(chan)
    deadline = time.monotonic() + timeout_seconds
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as error:
            last = error.code().name
        time.sleep(0.2)
    raise TimeoutError(f"{service} not SERVING after {timeout_seconds:.0f} s (last: {last})")


def info_response(service: str, model_id: str, tokenizer_fp: str = "", version: int = 0,
                  revision: str = "") -> belay_pb2.InfoResponse:
    return belay_pb2.InfoResponse(service=service, model_id=model_id, tokenizer_fingerprint=tokenizer_fp,
                                  policy_version=version, model_revision=revision)
