"""grpc.health.v1 on a ServiceServer: NOT_SERVING until mark_serving, SERVING after, NOT_SERVING
again once stop() begins; and a reference that has not loaded refuses work."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from belay.v1 import belay_pb2, belay_pb2_grpc
from services.common.config import GrpcConfig
from services.common.rpc import ServiceServer, channel, wait_until_serving
from services.reference.server import build_server as build_reference_server
from tests.conftest import free_port

from .conftest import RPC_TIMEOUT, make_config, rpc_error

NAMES = ["", "belay.v1.Reference"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(stub, service: str) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT).status


@pytest.fixture
def bare_server():
    config = GrpcConfig(workers=2, shutdown_grace_seconds=2.0)
    server = ServiceServer("127.0.0.1:0", config, ["belay.v1.Reference"])
    server.start()
    chan = channel(server.address, config)
    yield server, chan
    chan.close()
    server.stop()


def test_not_serving_before_mark_serving_and_serving_after(bare_server):
    server, chan = bare_server
    stub = health_pb2_grpc.HealthStub(chan)
    assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"
    for name in NAMES:
        assert check(stub, name) == NOT_SERVING
    with pytest.raises(TimeoutError, match="belay.v1.Reference not SERVING.*NOT_SERVING"):
        wait_until_serving(chan, "belay.v1.Reference", 0.5)
    server.mark_serving()
    for name in NAMES:
        assert check(stub, name) == SERVING
    wait_until_serving(chan, "belay.v1.Reference", 5.0)


def test_health_turns_not_serving_when_stop_begins(bare_server):
    server, chan = bare_server
    server.mark_serving()
    stub = health_pb2_grpc.HealthStub(chan)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="belay.v1.Reference"), timeout=RPC_TIMEOUT)
    assert next(watch).status == SERVING
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    try:
        assert next(watch).status == NOT_SERVING  # seen while the server drains, before it goes away
    finally:
        watch.cancel()
        stopper.join(10)
    assert not stopper.is_alive()
    with pytest.raises(grpc.RpcError) as caught:
        check(stub, "belay.v1.Reference")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_wait_until_serving_names_a_server_that_is_not_there():
    with channel(f"127.0.0.1:{free_port()}", GrpcConfig()) as chan:
        with pytest.raises(TimeoutError, match="belay.v1.Reward not SERVING.*UNAVAILABLE"):
            wait_until_serving(chan, "belay.v1.Reward", 0.5)


def test_a_reference_that_has_not_loaded_is_not_serving_and_refuses_work(tiny_lm_dir):
    config = make_config(reference={"model_dir": str(tiny_lm_dir)})
    server, servicer = build_reference_server(config, CollectorRegistry())
    server.start()
    try:
        with channel(server.address, config.grpc) as chan:
            assert check(health_pb2_grpc.HealthStub(chan), "belay.v1.Reference") == NOT_SERVING
            stub = belay_pb2_grpc.ReferenceStub(chan)
            error = rpc_error(stub.Info, belay_pb2.InfoRequest())
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "still loading" in error.details()
            error = rpc_error(stub.LogProbs, belay_pb2.LogProbsRequest())
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop()
