"""Container health probes for Belay's image (docker-compose.yml healthchecks, k8s exec probes).

    python /app/docker/healthcheck.py grpc 127.0.0.1:50052 belay.v1.Reference
        exit 0 when grpc.health.v1 answers SERVING for that service (our servers answer NOT_SERVING
        until the model is loaded and warm, and again once shutdown begins)
    python /app/docker/healthcheck.py trainer 9104
        exit 0 when the trainer's /metrics shows belay_trainer_ready 1 (resumed, about to train)

Exit 1 otherwise, with one line on stderr saying why (Docker keeps it in `docker inspect`).
grpc.health.v1 stays open without the bearer token (services/common/rpc.py), so no secret is needed
here. Plaintext only: with grpc.tls_* set, probe with Kubernetes' native gRPC probe or a TLS client.
"""

from __future__ import annotations

import sys
import urllib.request


def check_grpc(address: str, service: str, timeout: float) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as chan:
        try:
            reply = health_pb2_grpc.HealthStub(chan).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            return f"{address} {service!r}: {error.code().name} {error.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address} {service!r}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def check_trainer(port: int, timeout: float) -> str | None:
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            lines = reply.read().decode("utf-8", "replace").splitlines()
    except OSError as error:
        return f"{url}: {error}"
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "belay_trainer_ready":
            return None if float(parts[1]) == 1.0 else f"{url}: belay_trainer_ready {parts[1]}"
    return f"{url}: no belay_trainer_ready gauge"


def main(argv: list[str]) -> int:
    timeout = 4.0  # below the healthcheck's own timeout (5 s)
    if len(argv) == 3 and argv[0] == "grpc":
        problem = check_grpc(argv[1], argv[2], timeout)
    elif len(argv) == 2 and argv[0] == "trainer" and argv[1].isdigit():
        problem = check_trainer(int(argv[1]), timeout)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
