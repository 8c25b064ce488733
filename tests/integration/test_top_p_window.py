"""services.bench.top_p_window on the CPU: the nucleus sizes against their formula, a real (tiny)
model's sampled logits saved and timed again without the model, and flat logits all sent to the sort."""

from __future__ import annotations

import json
import math

import torch

from services.bench.top_p_window import SAVED_ROWS, main, nucleus_sizes


def test_a_nucleus_holds_the_likeliest_tokens_until_the_mass_before_the_next_reaches_top_p():
    logits = torch.tensor([[math.log(p) for p in (0.05, 0.5, 0.15, 0.3)]] * 3)
    assert nucleus_sizes(logits[:1], 0.7) == [2] and nucleus_sizes(logits, 0.85) == [3, 3, 3]
    assert nucleus_sizes(torch.zeros(1, 10), 0.9) == [9]  # flat: 0.8 before the ninth, 0.9 before the tenth


def test_logits_saved_from_a_model_time_the_filters_again_without_it(tiny_lm_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\nTell me about rivers.\nWhat is rain?\n")
    saved, first, second = tmp_path / "logits.safetensors", tmp_path / "first.json", tmp_path / "second.json"
    common = ["--device", "cpu", "--rows", "8", "--window", "4", "--repeats", "1"]
    main(
        ["--json", str(first), "--model", str(tiny_lm_dir), "--prompts", str(prompts), "--save-logits", str(saved)]
        + common
    )
    main(["--json", str(second), "--logits", str(saved)] + common)
    first, second = json.loads(first.read_text()), json.loads(second.read_text())
    nucleus = first["nucleus"]
    assert nucleus["rows"] > SAVED_ROWS and second["nucleus"]["rows"] == SAVED_ROWS  # saved: a sample of the rows
    assert first["vocab_size"] == second["vocab_size"] > 4
    assert nucleus["share_within_window"] == 0.0  # a tiny random model's nucleus never fits in 4 tokens
    assert nucleus["median"] <= nucleus["p99"] <= nucleus["max"] <= first["vocab_size"]
    for figures in (first, second):  # the tiny random model's distributions are flat: no nucleus fits in 4 tokens
        assert figures["flat"]["fallback_share"] == 1.0 and figures["real"]["fallback_share"] == 1.0
        assert figures["real"]["full_sort_ms"] > 0 and figures["real"]["window_ms"] > 0
