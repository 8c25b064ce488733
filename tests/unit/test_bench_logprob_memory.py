"""services/bench/logprob_memory.py on the tiny shape, in process: both paths run, agree, and report.
(The memory figures themselves are not asserted: they are for reading, and vary with the machine.)"""

from __future__ import annotations

import torch

from services.bench.logprob_memory import build_model, measure, parse_args, random_batch, summary

CPU = torch.device("cpu")


def test_both_paths_run_and_their_chosen_log_probs_agree():
    torch.set_num_threads(1)
    args = parse_args(["--vocab-size", "1024", "--batch", "2", "--prompt-tokens", "8", "--response-tokens", "8"])
    model = build_model(args.shape, args.vocab_size, torch.float32, CPU)
    batch = random_batch(1024, args.batch, args.prompt_tokens, args.response_tokens, CPU)
    results = {path: measure(path, model, batch, 5, CPU) for path in ("full", "chunked")}
    report = summary(args, CPU, "fp32", results)
    assert report["max_abs_difference_chosen_logprobs"] < 1e-5
    assert report["full_log_softmax_bytes"] == 2 * 15 * 1024 * 4
    for path in ("full", "chunked"):
        assert report[path]["seconds"] > 0 and "peak_extra_bytes" in report[path]
