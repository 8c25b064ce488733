"""Drive docker-compose.yml under podman-compose as a user would: `make test-compose` (test_stack.py).

The images come from tests/compose/build_images.sh, podman's settings from the CONTAINERS_CONF it
writes. Three things podman-compose and podman 4.3 do differently from Docker Compose, handled here:

- No health verdict without systemd: podman 4.3 runs healthchecks from systemd timers, and nothing here
  is systemd, so a container stays "starting". `wait_healthy` runs `podman healthcheck run` itself, at
  the service's own interval, until it passes (or the check is declared unhealthy, or a timeout).
- No `depends_on: condition: service_healthy`: podman-compose skips that check below podman 4.6 (and
  its `podman wait --condition=healthy` hangs where it runs). `bring_up` starts the services stage by
  stage from the compose file's own depends_on (`up -d --no-deps <stage>`), waiting for each stage's
  condition (healthy, or exited 0 for a one-shot) before the next.
- `up` on a service whose config changed also recreates every running service that depends on it:
  `replace` removes the one container first, so swapping the reward leaves the policy and trainer running.
- `down` stops every container at once, Redis with the trainer: `down` stops them in reverse
  dependency order first, as Docker Compose does.

Every failure is a StackError whose message starts with the service's name.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import yaml

from services.common.ports import free_ports

REPO = pathlib.Path(__file__).resolve().parents[2]
BASE_FILES = [
    REPO / "docker-compose.yml",
    REPO / "docker-compose.cpu.yml",
    REPO / "deploy/compose/podman-test.override.yml",
]
REWARD_EXAMPLE = REPO / "deploy/compose/reward-example.override.yml"
WORK = REPO / "build/compose"


class StackError(AssertionError):
    """Something a user of the stack would see go wrong; the message names the service."""


def log(message: str) -> None:
    print(f"[compose {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def seconds(duration: str | int | float | None, default: float) -> float:
    """Compose durations ('1m30s', '500ms', '10s') in seconds."""
    if duration is None:
        return default
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    return sum(float(number) * units[unit] for number, unit in parts) if parts else default


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise StackError(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


@dataclass
class Stack:
    """One Compose project: its name (unique to the test), files, and the settings .env would hold."""

    project: str
    files: list[pathlib.Path]
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- podman-compose
    def compose(
        self, *args: str, timeout: float = 600, check: bool = True, files: list[pathlib.Path] | None = None
    ) -> subprocess.CompletedProcess:
        command = [str(pathlib.Path(sys.executable).with_name("podman-compose")), "-p", self.project]
        for path in files or self.files:
            command += ["-f", str(path)]
        environ = {**os.environ, **self.env}
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=timeout, env=environ, cwd=REPO
        )
        if check and result.returncode != 0:
            raise StackError(
                f"podman-compose {' '.join(args)} exited {result.returncode}:\n"
                f"{(result.stdout + result.stderr).strip()[-3000:]}"
            )
        return result

    def config(self) -> dict:
        """The merged, interpolated compose file as podman-compose reads it."""
        return yaml.safe_load(self.compose("config", timeout=60).stdout)

    def active_services(self, config: dict) -> dict[str, dict]:
        """Services without a profile: what `up` starts (the test activates no profile)."""
        return {name: service for name, service in config["services"].items() if not service.get("profiles")}

    def container(self, service: str) -> str:
        """The name of the service's container (one replica), or StackError."""
        names = podman(
            "ps",
            "-a",
            "--filter",
            f"label=io.podman.compose.project={self.project}",
            "--filter",
            f"label=io.podman.compose.service={service}",
            "--format",
            "{{.Names}}",
        ).stdout.split()
        if not names:
            raise StackError(f"{service}: no container in project {self.project}")
        return names[0]

    # ----------------------------------------------------------------------------- health
    def inspect(self, service: str) -> dict:
        return json.loads(podman("inspect", self.container(service)).stdout)[0]

    def health_output(self, service: str) -> str:
        state = self.inspect(service)["State"]
        health = state.get("Health") or state.get("Healthcheck") or {}
        entries = health.get("Log") or []
        return entries[-1].get("Output", "").strip() if entries else ""

    def logs(self, service: str, lines: int = 30) -> str:
        result = podman("logs", "--tail", str(lines), self.container(service), check=False)
        return (result.stdout + result.stderr).strip()

    def wait_healthy(self, service: str, healthcheck: dict, timeout: float) -> float:
        """Run the service's healthcheck (`podman healthcheck run`) at its interval until it passes.
        StackError, naming the service, if the container exits, the check is declared unhealthy
        (its retries spent after start_period) or `timeout` passes. Returns the seconds it took."""
        started = time.monotonic()
        interval = min(seconds(healthcheck.get("interval"), 30), 5.0)
        container = self.container(service)
        last = ""
        while True:
            state = self.inspect(service)["State"]
            if state.get("Status") in ("exited", "stopped") or not state.get("Running", True):
                raise StackError(
                    f"{service}: exited (code {state.get('ExitCode')}) before it was healthy; "
                    f"last log lines:\n{self.logs(service)}"
                )
            run = podman(
                "healthcheck", "run", container, check=False, timeout=seconds(healthcheck.get("timeout"), 30) + 30
            )
            if run.returncode == 0:
                return time.monotonic() - started
            last = self.health_output(service) or (run.stdout + run.stderr).strip()
            # podman's verdict: "starting" while failures fall in start_period, "unhealthy" once
            # `retries` failures in a row follow it (`podman healthcheck run` prints "unhealthy" for
            # any failed run, so its output is no verdict)
            state = self.inspect(service)["State"]
            status = (state.get("Health") or state.get("Healthcheck") or {}).get("Status", "")
            if status == "unhealthy":
                raise StackError(
                    f"{service}: healthcheck {healthcheck.get('test')} is unhealthy "
                    f"({self.health_output(service) or last}); last log lines:\n{self.logs(service)}"
                )
            if time.monotonic() - started > timeout:
                raise StackError(
                    f"{service}: not healthy after {timeout:.0f}s; healthcheck {healthcheck.get('test')} "
                    f"last said: {self.health_output(service) or last!r}; last log lines:\n{self.logs(service)}"
                )
            time.sleep(interval)

    def wait_completed(self, service: str, timeout: float) -> float:
        """A one-shot service (depends_on: service_completed_successfully) exits 0 within `timeout`."""
        result = podman("wait", self.container(service), timeout=timeout, check=False)
        if result.returncode != 0:
            raise StackError(f"{service}: did not finish within {timeout:.0f}s: {result.stderr.strip()}")
        code = int(result.stdout.strip().splitlines()[-1])
        if code != 0:
            raise StackError(f"{service}: exited {code}; last log lines:\n{self.logs(service)}")
        return code

    # ----------------------------------------------------------------------------- up and down
    def stages(self, config: dict, services: list[str] | None = None) -> list[list[str]]:
        """Active services grouped by depth in depends_on: each stage depends only on earlier ones."""
        active = self.active_services(config)
        wanted = set(services or active)
        depth: dict[str, int] = {}

        def level(name: str, seen: tuple[str, ...] = ()) -> int:
            if name in seen:
                raise StackError(f"{name}: depends_on cycle {' -> '.join(seen + (name,))}")
            if name not in depth:
                dependencies = [d for d in (active[name].get("depends_on") or {}) if d in wanted]
                depth[name] = 1 + max((level(d, seen + (name,)) for d in dependencies), default=-1)
            return depth[name]

        for name in wanted:
            level(name)
        return [sorted(n for n in wanted if depth[n] == k) for k in range(max(depth.values(), default=-1) + 1)]

    def bring_up(self, services: list[str] | None = None, health_timeout: float = 900) -> None:
        """Start the services stage by stage, each stage only once the one before meets the
        conditions depends_on names (healthy; exited 0 for a one-shot)."""
        config = self.config()
        active = self.active_services(config)
        for name in services or active:  # never let the engine reach for a registry
            image = active[name]["image"]
            if podman("image", "exists", image, check=False).returncode != 0:
                raise StackError(
                    f"{name}: image {image} is not on this machine (tests/compose/build_images.sh "
                    "builds every image the test runs; none is pulled)"
                )
        for stage in self.stages(config, services):
            started = time.monotonic()
            log(f"up {' '.join(stage)}")
            self.compose("up", "-d", "--no-deps", *stage)
            for name in stage:
                service = active[name]
                if str(service.get("restart", "no")) == "no" and not service.get("healthcheck"):
                    self.wait_completed(name, timeout=health_timeout)
                    log(f"{name}: completed ({time.monotonic() - started:.0f}s)")
                elif service.get("healthcheck") and not service["healthcheck"].get("disable"):
                    self.wait_healthy(name, service["healthcheck"], timeout=health_timeout)
                    log(f"{name}: healthy ({time.monotonic() - started:.0f}s)")

    def replace(self, service: str, files: list[pathlib.Path], health_timeout: float = 600) -> None:
        """Swap one service for its definition in `files` while the rest keeps running."""
        podman("rm", "--force", "--time", "30", self.container(service), timeout=120)
        self.files = files
        config = self.config()
        self.compose("up", "-d", "--no-deps", service)
        self.wait_healthy(service, config["services"][service]["healthcheck"], timeout=health_timeout)

    def down(self, volumes: bool = False, timeout: float = 600) -> None:
        """`compose down`, dependents first. podman-compose's own `down` stops every container at
        once: Redis can then go while the trainer, on SIGTERM, finishes its step, and the trainer
        can neither announce the version it persisted nor acknowledge its rollouts (it waits on
        Redis until its stop_grace_period runs out). Docker Compose stops in reverse dependency
        order; so does this, one stage at a time (`stop`), before `down` removes the containers."""
        for stage in reversed(self.stages(self.config())):
            self.compose("stop", *stage, timeout=timeout)
        self.compose("down", *(["--volumes"] if volumes else []), timeout=timeout)

    def purge(self) -> None:
        """Remove everything of the project, whatever state it is in: containers, pods, volumes,
        networks (by the labels podman-compose puts on them, and by name)."""
        label = f"label=io.podman.compose.project={self.project}"
        ids = podman("ps", "-a", "-q", "--filter", label, check=False).stdout.split()
        if ids:
            podman("rm", "--force", "--time", "10", *ids, check=False, timeout=300)
        pods = podman("pod", "ps", "-q", "--filter", f"name={self.project}", check=False).stdout.split()
        if pods:
            podman("pod", "rm", "--force", *pods, check=False, timeout=120)
        volumes = set(podman("volume", "ls", "-q", "--filter", label, check=False).stdout.split())
        volumes |= {
            v for v in podman("volume", "ls", "-q", check=False).stdout.split() if v.startswith(f"{self.project}_")
        }
        if volumes:
            podman("volume", "rm", "--force", *sorted(volumes), check=False, timeout=120)
        networks = {
            n
            for n in podman("network", "ls", "--format", "{{.Name}}", check=False).stdout.split()
            if n == f"{self.project}_default" or n.startswith(f"{self.project}_")
        }
        if networks:
            podman("network", "rm", "--force", *sorted(networks), check=False)

    # ----------------------------------------------------------------------------- what a user sees
    def redis(self, *args: str) -> str:
        """redis-cli in the Redis container (`docker compose exec redis redis-cli ...`)."""
        return podman("exec", self.container("redis"), "redis-cli", "--raw", *args, timeout=60).stdout.strip()

    def prometheus(self, path: str, **params: str) -> dict:
        """Prometheus's HTTP API on the port it publishes on 127.0.0.1."""
        url = f"http://127.0.0.1:{self.env['PROMETHEUS_PORT']}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=30) as reply:
            body = json.load(reply)
        if body.get("status") != "success":
            raise StackError(f"prometheus: {path} answered {body}")
        return body["data"]


def new_stack(project: str, files: list[pathlib.Path] | None = None) -> Stack:
    """A stack with the settings a user puts in .env: the model, a gRPC token file readable by the
    image's user (uid 10001), a Grafana password (required by the file even though Grafana is not
    started here), a run name, and free loopback ports to publish on."""
    folder = WORK / project
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "grpc_token"
    token.write_text(os.urandom(16).hex() + "\n")
    token.chmod(0o644)
    folder.chmod(0o755)
    prometheus, review, grafana = free_ports(3)
    env = {
        "MODEL_DIR": "/models/SmolLM2-135M-Instruct",
        "GRPC_TOKEN_FILE": str(token),
        "GRAFANA_ADMIN_PASSWORD": os.urandom(12).hex(),
        "RUN_NAME": "composetest",
        "PROMETHEUS_PORT": str(prometheus),
        "REVIEW_PORT": str(review),
        "GRAFANA_PORT": str(grafana),
    }
    return Stack(project=project, files=list(files or BASE_FILES), env=env)


def engine_ready() -> str | None:
    """None when podman, podman-compose and the images are there; otherwise what is missing."""
    if shutil.which("podman") is None:
        return "podman is not installed (tests/compose/build_images.sh installs it)"
    if not pathlib.Path(sys.executable).with_name("podman-compose").exists():
        return "podman-compose is not installed in this environment (tests/compose/build_images.sh)"
    if not os.environ.get("CONTAINERS_CONF"):
        return "CONTAINERS_CONF is not set (make test-compose sets it to build/compose/containers.conf)"
    for image in ("belay:0.1.0-cpu", "localhost/belay-test/redis:bookworm"):
        if podman("image", "exists", image, check=False).returncode != 0:
            return f"image {image} is missing (tests/compose/build_images.sh builds it)"
    return None
