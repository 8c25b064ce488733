"""`belay up` the way a user runs it: a real command, its printed progress, and a clean stop."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import yaml

from services.common.config import BelayConfig
from tests.system.conftest import REPO


def write_config(config: BelayConfig, path) -> str:
    data = config.model_dump(mode="json")
    data["trainer"]["max_steps"] = 0
    path.write_text(yaml.safe_dump(data))
    return str(path)


def port_closed(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


def test_belay_up_runs_n_iterations_prints_progress_and_stops_everything(stack_config, tmp_path):
    config_file = write_config(stack_config, tmp_path / "belay.yaml")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--config",
            config_file,
            "--iterations",
            "2",
            "--run-dir",
            str(tmp_path / "run"),
            "--startup-timeout",
            "180",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "policy version 0" in out  # the "before" answers come from the untrained policy
    assert "iteration 1/2" in out and "iteration 2/2" in out
    assert "KL/seq" in out and "before:" in out and "after:" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2
    assert set(summary["eval"]["models"]) == {"reference", "v000002"}
    assert "held-out reward" in out and "held-out perplexity" in out
    assert set(summary["mean_seconds"]) == {"generate", "reference", "reward", "update", "publish", "persist", "swap"}
    # The end-of-run report: the plots, and the canaries of version 0 and of the last version.
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert (tmp_path / "run" / "report" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| prompt | version 0 | version 2 |" in report
    assert "canary prompts, version 0 -> 2" in out
    for address in (
        stack_config.policy.address,
        stack_config.reference.address,
        stack_config.reward.address,
        stack_config.redis.url.split("//")[1].split("/")[0],
    ):
        assert port_closed(address), f"{address} still listening after belay up returned"


def test_ctrl_c_stops_cleanly_after_the_step_in_hand(stack_config, tmp_path):
    config_file = write_config(stack_config, tmp_path / "belay.yaml")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--config",
            config_file,
            "--run-dir",
            str(tmp_path / "run"),
            "--startup-timeout",
            "180",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stdout:
        lines.append(line)
        if line.startswith("iteration 1"):
            break
        assert time.monotonic() < deadline, "".join(lines)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "Ctrl-C" in out and "after training" in out
    assert port_closed(stack_config.policy.address) and port_closed(stack_config.reference.address)
