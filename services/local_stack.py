"""Redis and Belay's four services as local child processes: started in order, checked for health,
stopped in order. `belay up`, the bench's services mode and the system tests run the stack this way."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

import yaml

from .common.config import BelayConfig
from .common.rpc import channel, wait_until_serving

SERVICES = ("reference", "reward", "policy", "trainer")
STOP_ORDER = ("policy", "trainer", "reward", "reference")  # producers first; redis last


class StackError(RuntimeError):
    """A service that failed to start or died; the message carries its log's tail."""


def tail(path: pathlib.Path, lines: int = 25) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclasses.dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: pathlib.Path


class LocalStack:
    """Redis and the four services as child processes of this one, each in its own session so
    Ctrl-C reaches only the launcher, which then stops them in order."""

    def __init__(self, config: BelayConfig, run_dir: pathlib.Path, say=print):
        self.config, self.run_dir, self.say = config, run_dir, say
        self.processes: dict[str, Process] = {}
        self.config_path = run_dir / "config.yaml"

    def _spawn(self, name: str, command: list[str]) -> None:
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log_path, "ab")
        popen = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=os.getcwd(),
        )
        handle.close()
        self.processes[name] = Process(name, popen, log_path)

    def start(self, names: tuple[str, ...] = SERVICES) -> None:
        """Redis (on first call), then the named services."""
        if "redis" not in self.processes:
            self._start_redis()
        for name in names:
            self._spawn(name, [sys.executable, "-m", f"services.{name}", "--config", str(self.config_path)])

    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash, for fault tests)."""
        process = self.processes[name].popen
        process.kill()
        process.wait()

    def restart(self, name: str) -> None:
        """Start one stopped process again with the same command (what an orchestrator does)."""
        if name == "redis":
            self._start_redis()
        else:
            self.start((name,))

    def _start_redis(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))
        url = urlparse(self.config.redis.url)
        redis_dir = self.run_dir / "redis"
        redis_dir.mkdir(exist_ok=True)
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise StackError(
                "redis-server is not installed (Debian: apt-get install redis-server; `make setup` does it)"
            )
        self._spawn(
            "redis",
            [
                redis_server,
                "--port",
                str(url.port or 6379),
                "--bind",
                url.hostname or "127.0.0.1",
                "--dir",
                str(redis_dir),
                "--save",
                "",
                "--protected-mode",
                "yes",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
        )  # a kill -9 of Redis loses no write
        self._wait_redis()

    def _wait_redis(self, timeout: float = 20) -> None:
        import redis

        client = redis.Redis.from_url(self.config.redis.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise StackError(
            f"redis-server did not answer at {self.config.redis.url}:\n{tail(self.processes['redis'].log_path)}"
        )

    def check_alive(self) -> None:
        for process in self.processes.values():
            code = process.popen.poll()
            if code is not None and not (process.name == "trainer" and code == 0):  # 0: reached max_steps
                raise StackError(
                    f"{process.name} exited with code {code}; the end of {process.log_path}:\n{tail(process.log_path)}"
                )

    def wait_healthy(self, timeout: float, trainer: bool = True) -> None:
        deadline = time.monotonic() + timeout
        targets = [
            ("reference", "belay.v1.Reference", self.config.reference.address),
            ("reward", "belay.v1.Reward", self.config.reward.address),
            ("policy", "belay.v1.Policy", self.config.policy.address),
        ]
        for name, service, address in targets:
            self.say(f"  waiting for {name} at {address} ...")
            chan = channel(address, self.config.grpc)
            while True:
                self.check_alive()
                try:
                    wait_until_serving(chan, service, 2.0)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"{name} not healthy after {timeout:.0f} s:\n{tail(self.processes[name].log_path)}"
                        ) from None
        if not trainer:
            return
        self.say(f"  waiting for trainer (metrics on :{self.config.trainer.metrics_port}) ...")
        while not self.trainer_ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise StackError(
                    f"trainer not ready after {timeout:.0f} s:\n{tail(self.processes['trainer'].log_path)}"
                )
            time.sleep(0.5)

    def trainer_finished(self) -> bool:
        """The trainer exited 0: it reached max_steps or the end of the data, and persisted."""
        trainer = self.processes.get("trainer")
        return trainer is not None and trainer.popen.poll() == 0

    def trainer_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.config.trainer.metrics_port}/metrics", timeout=2) as r:
                lines = r.read().decode().splitlines()
        except OSError:  # not listening yet; or it already finished its max_steps and exited 0
            return self.processes["trainer"].popen.poll() == 0
        return any(line.split()[:2] == ["belay_trainer_ready", "1.0"] for line in lines)

    def peak_memory_bytes(self) -> dict[str, int]:
        """Each running process's peak resident set so far (VmHWM in /proc/<pid>/status, Linux);
        read it before stop(). A process that has exited is left out."""
        peaks = {}
        for name, process in self.processes.items():
            if process.popen.poll() is not None:
                continue
            try:
                status = pathlib.Path(f"/proc/{process.popen.pid}/status").read_text()
            except OSError:  # exited meanwhile
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks[name] = int(line.split()[1]) * 1024  # reported in kB
        return peaks

    def stop(self, grace: float = 60.0, trainer_grace: float = 900.0) -> None:
        """SIGTERM in order (producers first, redis last), SIGKILL past the grace. The trainer gets
        longer: on SIGTERM it persists every update since its last checkpoint (1.6 GB at 135M, about
        18 GB at 1.5B, fsynced), and killing it there would throw those updates away."""
        for name in (*STOP_ORDER, "redis"):
            process = self.processes.get(name)
            if process is None or process.popen.poll() is not None:
                continue
            process.popen.send_signal(signal.SIGTERM)
            try:
                process.popen.wait(timeout=trainer_grace if name == "trainer" else grace)
            except subprocess.TimeoutExpired:
                self.say(f"  {name} did not stop in time: killing it")
                process.popen.kill()
                process.popen.wait()
