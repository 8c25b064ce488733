"""python -m services.reference --config belay.yaml : config -> frozen model -> gRPC server, and a
watch on the frozen weights: if they ever change, the service stops (the seed's floor moved)."""

import logging
import os
import threading

from ..common.memory_check import cap_process_memory, log_memory_plan
from ..common.service_main import serve, start
from .server import build_server

log = logging.getLogger("services.reference")
config = start("Belay reference service (frozen SFT model)", torch_threads="reference")
cap_process_memory(*log_memory_plan(config, "reference"))  # logs the plan; caps this process to its share


def watch_frozen_weights(servicer) -> None:
    while True:
        threading.Event().wait(config.reference.fingerprint_check_seconds)
        problem = servicer.weights_changed()
        if problem is not None:
            log.critical("%s: stopping; the run must not go on against a moved reference", problem)
            os._exit(3)


serve(
    build_server,
    config,
    config.reference.metrics_port,
    on_loaded=lambda servicer: threading.Thread(target=watch_frozen_weights, args=(servicer,), daemon=True).start(),
)
