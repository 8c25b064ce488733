"""`belay up` on a dataset with data.epochs: the run ends by itself after the last epoch (the actor
stops producing, the trainer trains what makes whole batches, persists and exits 0, `belay up`
finishes and stops everything), and every row was sampled exactly once per epoch."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from services.common.config import BelayConfig
from tests.system.conftest import REPO


def test_belay_up_on_a_dataset_ends_after_its_last_epoch(stack_config: BelayConfig, tmp_path):
    rows = [{"question": f"Say the number {i}.", "answer": str(i)} for i in range(8)]
    dataset = tmp_path / "numbers.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = stack_config.model_dump(mode="json")
    data["trainer"]["max_steps"] = 0  # only the data ends this run
    data["data"] = {"path": str(dataset), "prompt_column": "question", "metadata_columns": ["answer"], "epochs": 1}
    config_file = tmp_path / "belay.yaml"
    config_file.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--config", str(config_file), "--no-eval"]
        + ["--run-dir", str(tmp_path / "run"), "--startup-timeout", "180"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "the data is used up (data.epochs)" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2  # 8 rows x 2 samples = 16 rollouts = 2 batches of 8
    logs = (tmp_path / "run" / "logs" / "trainer.log").read_text()
    assert "the actor's data is used up and every rollout is read" in logs
    assert (tmp_path / "run" / "checkpoints" / "v000002").is_dir()  # persisted at the end
    policy_log = (tmp_path / "run" / "logs" / "policy.log").read_text()
    assert "numbers.jsonl: 8 training rows, 0 held out" in policy_log
    assert "the data is used up (1 epochs of 8 rows" in policy_log
