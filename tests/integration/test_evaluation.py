"""`belay eval`: each metric against its definition, the reference against itself, and the command."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

from services.common import sample_statistics
from services.common.config import BelayConfig
from services.common.models import load_causal_lm, load_tokenizer
from services.common.prompts import read_prompts
from services.evaluation import metrics
from services.evaluation.runner import EvalSettings, evaluate
from services.reward.backends import HFClassifierBackend
from tests.strict_json import strict_loads

REPO = pathlib.Path(__file__).resolve().parents[2]
SETTINGS = EvalSettings(max_new_tokens=8, samples_per_prompt=2, seed=7)


def test_distinct_n_and_repetition_on_fixed_strings():
    assert sample_statistics.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert sample_statistics.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # "a b", "b a", "a b"
    assert sample_statistics.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)  # counted over all texts together
    assert sample_statistics.distinct_n(["a"], 2) == 0.0
    assert sample_statistics.repetition("a b c a b c", 3) == pytest.approx(1 - 3 / 4)  # abc bca cab abc
    assert sample_statistics.repetition("one two three four", 3) == 0.0


def test_perplexity_is_exp_of_mean_token_nll(tiny_lm_dir):
    model = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "m").eval()
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    texts = ["I love this, it is good.", "How are you feeling today?"]
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        for position in range(1, len(ids)):
            probabilities = torch.softmax(logits[position - 1].double(), -1)
            total -= math.log(probabilities[ids[position]].item())
            count += 1
    nll, predicted = metrics.text_nll(model, tokenizer, texts)
    assert predicted == count
    assert metrics.perplexity(nll, predicted) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_exact_kl_per_token_on_known_distributions():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]])
    q = torch.tensor([[0.25, 0.25, 0.5], [0.9, 0.05, 0.05]])
    got = metrics.exact_kl_per_token(p.log(), q.log())
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip([0.5, 0.25, 0.25], [0.25, 0.25, 0.5]))
    assert got[0].item() == pytest.approx(expected, rel=1e-6)
    assert got[1].item() == pytest.approx(0.0, abs=1e-7)


def eval_config(lm_dir, reward_dir) -> BelayConfig:
    return BelayConfig.model_validate(
        {
            "reference": {"model_dir": str(lm_dir), "device": "cpu"},
            "reward": {"backend": "hf_classifier", "model_dir": str(reward_dir)},
        }
    )


def test_reference_against_itself_has_zero_kl_and_identical_numbers(tiny_lm_dir, tiny_reward_dir):
    config = eval_config(tiny_lm_dir, tiny_reward_dir)
    backend = HFClassifierBackend(str(tiny_reward_dir), torch.device("cpu"), 256)
    results = evaluate(
        config,
        [None, pathlib.Path(tiny_lm_dir)],
        backend,
        str(REPO / "prompts/heldout.txt"),
        str(REPO / "data/heldout_text.txt"),
        SETTINGS,
    )
    reference, copy = results["models"]["reference"], results["models"][pathlib.Path(tiny_lm_dir).name]
    assert abs(reference["kl_per_sequence"]) < 1e-5 and abs(reference["kl_exact_per_token"]) < 1e-6
    assert abs(copy["kl_per_sequence"]) < 1e-4 and abs(copy["kl_exact_per_token"]) < 1e-6
    for key in ("reward_mean", "reward_std", "response_length", "distinct_2", "perplexity"):
        assert copy[key] == pytest.approx(reference[key], rel=1e-6), key
    assert results["settings"] == {
        "temperature": 1.0,
        "top_p": 0.9,
        "max_new_tokens": 8,
        "samples_per_prompt": 2,
        "seed": 7,
    }
    again = evaluate(
        config, [None], backend, str(REPO / "prompts/heldout.txt"), str(REPO / "data/heldout_text.txt"), SETTINGS
    )
    assert again["models"]["reference"] == reference  # seeded: two evals agree exactly


def test_a_different_model_shows_kl_and_another_perplexity(tiny_lm_dir, tiny_reward_dir, tmp_path):
    from tests.tiny_models import build_causal_lm

    other = build_causal_lm(tmp_path / "v000001", seed=9)
    config = eval_config(tiny_lm_dir, tiny_reward_dir)
    backend = HFClassifierBackend(str(tiny_reward_dir), torch.device("cpu"), 256)
    results = evaluate(
        config, [None, other], backend, str(REPO / "prompts/heldout.txt"), str(REPO / "data/heldout_text.txt"), SETTINGS
    )
    moved = results["models"]["v000001"]
    assert moved["kl_exact_per_token"] > 1e-4
    assert moved["perplexity"] != pytest.approx(results["models"]["reference"]["perplexity"], rel=1e-6)


def test_heldout_prompts_were_never_training_prompts():
    heldout = set(read_prompts(str(REPO / "prompts/heldout.txt")))
    assert heldout and not heldout & set(read_prompts(str(REPO / "prompts/default.txt")))


def test_belay_eval_command_prints_a_table_and_writes_json_and_plots(tiny_lm_dir, tiny_reward_dir, tmp_path):
    config_file = tmp_path / "belay.yaml"
    config_file.write_text(yaml.safe_dump(eval_config(tiny_lm_dir, tiny_reward_dir).model_dump(mode="json")))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "eval",
            "--config",
            str(config_file),
            "--checkpoint",
            str(tiny_lm_dir),
            "--max-new-tokens",
            "6",
            "--out",
            str(tmp_path / "eval"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "perplexity" in result.stdout and "reference" in result.stdout
    results = strict_loads((tmp_path / "eval" / "results.json").read_text())  # strict JSON: NaN as null
    assert set(results["models"]) == {"reference", pathlib.Path(tiny_lm_dir).name}
    for plot in ("frontier.png", "perplexity.png"):
        assert (tmp_path / "eval" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pearson_matches_numpy_and_is_zero_for_a_constant_sample():
    import numpy as np

    xs, ys = [1.0, 2.0, 3.0, 5.0], [2.0, 1.0, 4.0, 9.0]
    assert sample_statistics.pearson(xs, ys) == pytest.approx(np.corrcoef(xs, ys)[0, 1])
    assert sample_statistics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0
