"""python -m services.reward --config belay.yaml : config -> reward backend -> gRPC server."""

from ..common.service_main import serve, start
from .server import build_server

config = start("Belay reward service", torch_threads="reward")
serve(build_server, config, config.reward.metrics_port)
