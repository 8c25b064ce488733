"""Your own reward service in its own process: 1.0 for a response that ends with a full stop, else 0.0.

Any server that speaks belay.v1.Reward (Score, Info) and grpc.health.v1 can replace Belay's:
    python examples/reward_server/server.py --address 127.0.0.1:50070
    belay check-reward 127.0.0.1:50070        # checks it against the protocol
then point reward.address at it (docker compose: deploy/compose/reward-example.override.yml).
"""

import argparse
import pathlib
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "gen"))  # the belay.v1 stubs
from belay.v1 import belay_pb2, belay_pb2_grpc

MODEL_ID = "example-ends-with-full-stop"


class FullStopReward(belay_pb2_grpc.RewardServicer):
    def Score(self, request, context):
        if not request.responses or len(request.prompts) != len(request.responses):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"need as many prompts as responses, at least one ({len(request.prompts)} vs {len(request.responses)})",
            )
        scores = [1.0 if text.rstrip().endswith(".") else 0.0 for text in request.responses]
        return belay_pb2.ScoreResponse(scores=scores, reward_model_id=MODEL_ID, reward_model_revision="1")

    def Info(self, request, context):
        return belay_pb2.InfoResponse(service="reward", model_id=MODEL_ID, model_revision="1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50070", help="host:port to listen on")
    address = parser.parse_args().address
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    belay_pb2_grpc.add_RewardServicer_to_server(FullStopReward(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", "belay.v1.Reward"):  # SERVING once it can score (here: at once)
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(address)
    server.start()
    print(f"reward example serving on {address}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
