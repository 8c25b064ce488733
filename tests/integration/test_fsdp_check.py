"""services.bench.fsdp_check, the GPU session's check of the trainer's fsdp path (NCCL and
MixedPrecisionPolicy there), run here on the CPU at one gloo rank with the tiny shape: the sharded
update equals the plain one and the figures it writes are the ones it prints."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from tests.conftest import free_port

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_one_sharded_rank_updates_the_weights_exactly_as_one_plain_process(tmp_path):
    out = tmp_path / "fsdp.json"
    temporary = set(pathlib.Path(tempfile.gettempdir()).glob("belay-fsdp-check*"))
    done = subprocess.run(
        [sys.executable, "-m", "services.bench.fsdp_check", "--shape", "tiny", "--device", "cpu", "--rows", "4"]
        + ["--prompt-tokens", "8", "--response-tokens", "8", "--workdir", str(tmp_path), "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MASTER_PORT": str(free_port())},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["world_size"] == 1 and figures["backend"] == "gloo" and figures["compute_dtype"] == "float32"
    assert figures["max_abs_weight_move"] > 1e-6  # the update moved the weights...
    assert figures["max_abs_weight_diff"] == 0.0  # ...and one FSDP2 rank moved them exactly as one process
    assert f"max weight diff {figures['max_abs_weight_diff']:.2e}" in done.stderr
    assert set(pathlib.Path(tempfile.gettempdir()).glob("belay-fsdp-check*")) == temporary  # all under --workdir
