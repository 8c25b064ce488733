"""What every service's __main__ does before its own wiring: parse --config, set up logging and torch."""

from __future__ import annotations

import argparse
import logging

from .config import BelayConfig, load_config_or_exit


def start(description: str, torch_threads: str | None = None) -> BelayConfig:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="Belay YAML config (BELAY_SECTION__FIELD env vars override it)")
    args = parser.parse_args()
    config = load_config_or_exit(args.config)
    logging.basicConfig(level=config.run.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if torch_threads is not None:
        threads = getattr(config, torch_threads).torch_threads
        if threads:
            import torch

            torch.set_num_threads(threads)
    return config


def serve(build_server, config: BelayConfig, metrics_port: int, on_loaded=None) -> None:
    """Wire a model service: build it, serve /metrics, start gRPC (NOT_SERVING), load, SERVING, wait.
    on_loaded(servicer), if given, runs once the model is loaded."""
    from prometheus_client import CollectorRegistry

    from .metrics import serve_metrics

    registry = CollectorRegistry()
    server, servicer = build_server(config, registry)
    serve_metrics(registry, metrics_port, config.run.metrics_address)
    server.stop_on_signals()
    server.start()
    servicer.load()
    if on_loaded is not None:
        on_loaded(servicer)
    server.mark_serving()
    server.wait()
