"""Prometheus plumbing: each service builds its metrics on its own registry and serves /metrics."""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# LLM calls take seconds to minutes; the client's default buckets stop at 10 s.
LLM_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


def serve_metrics(registry: CollectorRegistry, port: int, address: str) -> int:
    """Serve /metrics on address:port (port 0: none). Returns the port.

    run.metrics_address is loopback by default: metrics name the run and the model, and nothing
    beyond this machine is let in unless the config says so (e.g. 0.0.0.0 in a compose network)."""
    if port:
        start_http_server(port, addr=address, registry=registry)
    return port


# (name, help, torch.cuda function of a device index) of the device memory gauges
DEVICE_MEMORY = (
    ("allocated", "bytes the CUDA caching allocator has handed out now", "memory_allocated"),
    ("reserved", "bytes the CUDA caching allocator holds from the driver now", "memory_reserved"),
    ("peak_allocated", "most bytes handed out at once since start", "max_memory_allocated"),
    ("peak_reserved", "most bytes held from the driver at once since start", "max_memory_reserved"),
)


class DeviceMemory(Collector):
    """This process's CUDA memory, read at each scrape: belay_device_memory_{allocated,reserved,
    peak_allocated,peak_reserved}_bytes{device}, for each device it has reserved memory on. Its peak
    allocation is what the memory plan is checked against (docs/gpu.md); nvidia-smi's figure also counts
    the CUDA context and what the allocator holds unused. Nothing from a process that has not
    initialised CUDA (on the CPU, the families without series). torch is never imported here: a
    service without it has no CUDA memory."""

    def collect(self):
        torch = sys.modules.get("torch")
        cuda = torch.cuda if torch is not None and torch.cuda.is_initialized() else None
        devices = [i for i in range(cuda.device_count()) if cuda.max_memory_reserved(i) > 0] if cuda else []
        for name, help_text, read in DEVICE_MEMORY:
            family = GaugeMetricFamily(f"belay_device_memory_{name}_bytes", help_text, labels=["device"])
            for index in devices:
                family.add_metric([f"cuda:{index}"], getattr(cuda, read)(index))
            yield family


def run_info(registry: CollectorRegistry, service: str, run: str, model_id: str) -> Gauge:
    """belay_run_info, and the service's device memory (DeviceMemory): every service calls this once."""
    gauge = Gauge("belay_run_info", "Run identity (always 1)", ["service", "run", "model_id"], registry=registry)
    gauge.labels(service=service, run=run, model_id=model_id).set(1)
    registry.register(DeviceMemory())
    return gauge
