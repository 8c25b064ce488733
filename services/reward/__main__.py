"""python -m services.reward --config belay.yaml : config -> reward backend -> gRPC server."""

from ..common.memory_check import cap_process_memory, log_memory_plan
from ..common.service_main import serve, start
from .server import build_server

config = start("Belay reward service", torch_threads="reward")
cap_process_memory(*log_memory_plan(config, "reward"))  # logs the plan; caps this process to its share
serve(build_server, config, config.reward.metrics_port)
