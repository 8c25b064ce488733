"""Prometheus plumbing: each service builds its metrics on its own registry and serves /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, start_http_server

# LLM calls take seconds to minutes; the client's default buckets stop at 10 s.
LLM_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


def serve_metrics(registry: CollectorRegistry, port: int, address: str) -> int:
    """Serve /metrics on address:port (port 0: none). Returns the port.

    run.metrics_address is loopback by default: metrics name the run and the model, and nothing
    beyond this machine is let in unless the config says so (e.g. 0.0.0.0 in a compose network)."""
    if port:
        start_http_server(port, addr=address, registry=registry)
    return port


def run_info(registry: CollectorRegistry, service: str, run: str, model_id: str) -> Gauge:
    gauge = Gauge("belay_run_info", "Run identity (always 1)", ["service", "run", "model_id"], registry=registry)
    gauge.labels(service=service, run=run, model_id=model_id).set(1)
    return gauge
