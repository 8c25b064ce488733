"""The reference is the floor of PPO: a change to its weights after load is caught, and the
service stops rather than serve a moved reference."""

from __future__ import annotations

import subprocess
import sys
import time

import torch
import yaml

from tests.conftest import free_port
from tests.system.conftest import REPO

from .conftest import make_config, running_reference


def test_a_change_to_the_frozen_weights_is_detected(tiny_lm_dir):
    config = make_config(reference={"model_dir": str(tiny_lm_dir)})
    with running_reference(config) as reference:
        servicer = reference.servicer
        assert servicer.weights_changed() is None
        with torch.no_grad():  # an accident: something trained or edited the reference in place
            next(servicer.loaded.model.parameters()).add_(1e-3)
        problem = servicer.weights_changed()
        assert problem is not None and "reference weights changed since load" in problem


def test_the_reference_service_watches_its_weights_and_keeps_serving_while_they_hold(tiny_lm_dir, tmp_path):
    """The real process with a short watch interval: still alive after several checks."""
    config = make_config(
        reference={
            "model_dir": str(tiny_lm_dir),
            "address": f"127.0.0.1:{free_port()}",
            "fingerprint_check_seconds": 0.2,
        }
    )
    path = tmp_path / "belay.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    process = subprocess.Popen(
        [sys.executable, "-m", "services.reference", "--config", str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(8)  # load (a few seconds) and then a dozen or more checks
        assert process.poll() is None, process.stdout.read()
    finally:
        process.terminate()
        process.wait(30)
