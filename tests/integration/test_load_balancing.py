"""Clients spread calls over every replica a name resolves to (round_robin), as with a headless
Kubernetes Service in front of several reward or reference pods."""

from __future__ import annotations

from belay.v1 import belay_pb2, belay_pb2_grpc
from services.common.rpc import ServiceServer, channel

from .conftest import make_config


class CountingReward(belay_pb2_grpc.RewardServicer):
    def __init__(self):
        self.calls = 0

    def Score(self, request, context):
        self.calls += 1
        return belay_pb2.ScoreResponse(scores=[0.0] * len(request.responses), reward_model_id="count")


def test_calls_are_spread_over_every_replica():
    config = make_config()
    replicas, servers = [CountingReward(), CountingReward()], []
    for servicer in replicas:
        server = ServiceServer("127.0.0.1:0", config.grpc, ["belay.v1.Reward"])
        belay_pb2_grpc.add_RewardServicer_to_server(servicer, server.server)
        server.start()
        server.mark_serving()
        servers.append(server)
    try:
        target = "ipv4:" + ",".join(server.address for server in servers)  # what DNS gives for a headless Service
        stub = belay_pb2_grpc.RewardStub(channel(target, config.grpc))
        for _ in range(20):
            stub.Score(belay_pb2.ScoreRequest(prompts=["p"], responses=["r"]), timeout=10)
        assert all(servicer.calls >= 5 for servicer in replicas), [s.calls for s in replicas]
        assert sum(s.calls for s in replicas) == 20
    finally:
        for server in servers:
            server.stop()
