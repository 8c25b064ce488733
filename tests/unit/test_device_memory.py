"""belay_device_memory_*_bytes (services/common/metrics.py, DeviceMemory), registered by run_info in
every service, and the GPU stack bench's reading of it from a service's /metrics over HTTP.

This machine has no GPU, so the CUDA case stands torch in with an object answering torch.cuda's
memory functions (a mock: the only one here, and only of torch.cuda's readings); the CPU case is
the real torch, whose CUDA was never initialised."""

from __future__ import annotations

import sys
import types

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from services.bench.gpu_stack import format_result, scraped_total
from services.common.metrics import DEVICE_MEMORY, run_info
from services.common.ports import free_port

NAMES = {f"belay_device_memory_{name}_bytes" for name, _, _ in DEVICE_MEMORY}


def served_registry() -> tuple[CollectorRegistry, int]:
    registry, port = CollectorRegistry(), free_port()
    run_info(registry, "policy", "run", "model")
    start_http_server(port, addr="127.0.0.1", registry=registry)
    return registry, port


def test_on_the_cpu_the_families_are_exported_without_series():
    registry, port = served_registry()
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert NAMES <= set(families) and all(not families[name].samples for name in NAMES)
    assert scraped_total("127.0.0.1", port, "belay_device_memory_peak_allocated_bytes") is None


def stand_in_torch() -> types.SimpleNamespace:
    """torch.cuda with two devices, memory reserved on the first only; each reading a distinct value."""
    values = {"memory_allocated": 10, "memory_reserved": 20, "max_memory_allocated": 30, "max_memory_reserved": 40}

    def reading(name):
        return lambda index: values[name] * (index + 1) if index == 0 else 0

    cuda = types.SimpleNamespace(is_initialized=lambda: True, device_count=lambda: 2)
    for name in values:
        setattr(cuda, name, reading(name))
    return types.SimpleNamespace(cuda=cuda)


def test_on_cuda_each_device_with_memory_reserved_gets_its_readings(monkeypatch):
    registry, port = served_registry()
    monkeypatch.setitem(sys.modules, "torch", stand_in_torch())
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    read = {name: [(s.labels["device"], s.value) for s in families[name].samples] for name in NAMES}
    assert read == {
        "belay_device_memory_allocated_bytes": [("cuda:0", 10)],
        "belay_device_memory_reserved_bytes": [("cuda:0", 20)],
        "belay_device_memory_peak_allocated_bytes": [("cuda:0", 30)],  # cuda:1 reserved nothing: no series
        "belay_device_memory_peak_reserved_bytes": [("cuda:0", 40)],
    }
    assert scraped_total("127.0.0.1", port, "belay_device_memory_peak_allocated_bytes") == 30


def test_the_stack_bench_prints_each_services_three_peaks_side_by_side():
    keys = (
        "generation_tokens_per_second generate_seconds reference_seconds reward_seconds update_seconds "
        "update_mfu_vs_989 update_mfu_vs_measured_790 publish_seconds swap_seconds end_to_end_samples_per_second "
        "end_to_end_tokens_per_second"
    ).split()
    result = dict.fromkeys(keys, 1.0) | {
        "shape": "tiny", "device_name": "cpu", "dtype": "bfloat16", "kv_cache": "static", "rows": 4,
        "max_new_tokens": 8, "steps_measured": 1, "targets": {}, "wall_seconds": 3.0,
        "peak_gpu_memory_bytes": {
            "nvidia_smi": {"policy": 3 * 2**30, "trainer": 9 * 2**30},
            "allocator": {"policy": 2 * 2**30},  # the trainer's /metrics could not be read
            "plan": {"policy": 5 * 2**29, "trainer": 8 * 2**30},
        },
    }  # fmt: skip
    lines = format_result(result).splitlines()
    assert "  peak GPU memory policy           3.0 GiB (nvidia-smi), allocator 2.0, plan 2.5" in lines
    assert "  peak GPU memory trainer          9.0 GiB (nvidia-smi), allocator -, plan 8.0" in lines
