"""python -m services.reference --config belay.yaml : config -> frozen model -> gRPC server."""
from ..common.service_main import serve, start
from .server import build_server

config = start("Belay reference service (frozen SFT model)", torch_threads="reference")
serve(build_server, config, config.reference.metrics_port)
