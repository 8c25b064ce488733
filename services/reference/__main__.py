"""python -m services.reference --config belay.yaml : config -> frozen model -> gRPC server."""
from prometheus_client import CollectorRegistry

from ..common.metrics import serve_metrics
from ..common.service_main import start
from .server import build_server

config = start("Belay reference service (frozen SFT model)", torch_threads="reference")
registry = CollectorRegistry()
server, servicer = build_server(config, registry)
serve_metrics(registry, config.reference.metrics_port)
server.stop_on_signals()
server.start()
servicer.load()
server.mark_serving()
server.wait()
