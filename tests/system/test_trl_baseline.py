"""The TRL PPOTrainer baseline of `belay bench`, run as `belay bench` runs it: a subprocess on tiny
real models, one warm-up and one measured step, its figures read back from --json."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from services.bench.trl_baseline import padded_tokenizer
from tests.tiny_models import build_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
BATCH, MINIBATCH, NEW_TOKENS = 4, 2, 8


def run_baseline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.bench.trl_baseline", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def figures(tiny_lm_dir, tiny_reward_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("trl") / "trl.json"
    done = run_baseline(
        "--json",
        str(out),
        "--model-dir",
        str(tiny_lm_dir),
        "--reward-dir",
        str(tiny_reward_dir),
        "--iterations",
        "1",
        "--warmup",
        "1",
        "--batch",
        str(BATCH),
        "--minibatch-size",
        str(MINIBATCH),
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--torch-threads",
        "1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "", "the JSON goes to --json and logs to stderr: stdout stays empty for `belay bench`"
    return json.loads(out.read_text()) | {"_stderr": done.stderr}


def test_rates_follow_from_the_measured_step(figures):
    assert len(figures["step_seconds"]) == 1 and len(figures["warmup_step_seconds"]) == 1
    seconds = figures["step_seconds"][0]
    assert seconds > 0
    assert figures["seconds_per_step"] == pytest.approx(seconds)
    assert figures["samples_per_second"] == pytest.approx(BATCH / seconds)
    (tokens,) = figures["response_tokens_per_step"]
    assert BATCH <= tokens <= BATCH * NEW_TOKENS  # at least one token per response, at most the cap
    assert figures["tokens_per_second"] == pytest.approx(tokens / seconds)
    assert figures["peak_memory_bytes"] > 10 * 2**20  # ru_maxrss in bytes, not KiB: a torch process is > 10 MiB


def test_settings_echo_the_inputs(figures, tiny_lm_dir, tiny_reward_dir):
    settings, workload = figures["settings"], figures["workload"]
    assert settings["per_device_train_batch_size"] == BATCH
    assert settings["num_mini_batches"] == BATCH // MINIBATCH  # TRL's minibatch = batch / num_mini_batches
    assert settings["gradient_accumulation_steps"] == 1
    assert settings["response_length"] == NEW_TOKENS
    assert settings["total_episodes"] == 2 * BATCH  # warm-up + measured steps
    assert settings["num_ppo_epochs"] == 1 and settings["kl_coef"] == 0.2 and settings["kl_estimator"] == "k1"
    assert settings["stop_token"] == "eos" and settings["temperature"] == 1.0 and settings["torch_threads"] == 1
    assert workload["model_dir"] == str(tiny_lm_dir) and workload["reward_dir"] == str(tiny_reward_dir)
    assert (workload["iterations"], workload["warmup"], workload["minibatch_size"]) == (1, 1, MINIBATCH)
    assert figures["versions"]["trl"] == "0.29.1"


def test_trl_actually_trained_the_policy(figures):
    assert figures["policy_fingerprint_before"] != figures["policy_fingerprint_after"]
    (metrics,) = figures["trl_metrics"]  # the measured step's own log line
    assert metrics["episode"] == 2 * BATCH
    assert math.isfinite(metrics["objective/kl"]) and math.isfinite(metrics["loss/value_avg"])
    assert "===training policy===" in figures["_stderr"]  # TRL's own print, sent to stderr


def test_a_batch_that_minibatches_do_not_divide_is_refused(tiny_lm_dir, tiny_reward_dir, tmp_path):
    done = run_baseline(
        "--json",
        str(tmp_path / "x.json"),
        "--model-dir",
        str(tiny_lm_dir),
        "--reward-dir",
        str(tiny_reward_dir),
        "--batch",
        "4",
        "--minibatch-size",
        "3",
    )
    assert done.returncode != 0
    assert "batch size 4 is not a multiple of minibatch size 3" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_a_pad_token_equal_to_eos_is_replaced_or_refused(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as SmolLM2 ships; this vocabulary has no spare <|endoftext|>
    tokenizer.save_pretrained(tmp_path / "no_spare")
    with pytest.raises(ValueError, match="needs a pad token other than EOS"):
        padded_tokenizer(str(tmp_path / "no_spare"))
    spare = build_tokenizer()
    spare.add_tokens(["<|endoftext|>"], special_tokens=True)
    spare.pad_token = spare.eos_token
    spare.save_pretrained(tmp_path / "spare")
    loaded = padded_tokenizer(str(tmp_path / "spare"))
    assert loaded.pad_token == "<|endoftext|>" and loaded.pad_token_id != loaded.eos_token_id
    assert loaded.padding_side == "left"
