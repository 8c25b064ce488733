"""The top-p filter by a window of candidates (services/policy/nucleus.py, policy.top_p_window) against
transformers' full sort, on one device (issue #14): how often a real model's nucleus fits in the
window, and what one decode step's filter costs with each.

A real model (--model, default the embedded SmolLM2-135M-Instruct) samples the prompts of --prompts
through the policy engine at temperature 1 and top-p 0.9; a teacher-forced pass over each row then
gives the logits every response token was drawn from. Their nuclei's sizes say how often the window
settles a row. The filters are timed on --rows rows drawn from those logits (the real distributions)
and on flat random logits of the same vocabulary (a randomly initialised model's, as the GPU bench
samples: every row spills past the window and takes the full sort after it).

A GPU machine has no real model: --save-logits FILE keeps SAVED_ROWS of the real logits (float16
safetensors, about 6 MB at SmolLM2's vocabulary; make_kit.sh puts them in .gpukit/), and --logits FILE
times the filters on them there, without a model (its nucleus figures then come from those rows alone).

    python -m services.bench.top_p_window --json OUT [--model DIR | --logits FILE] [--save-logits FILE]
        [--device cpu] [--rows 256] [--window 1024]
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics

import torch
from safetensors.torch import load_file, save_file
from transformers import TopPLogitsWarper

from ..common.config import GrpcConfig
from ..common.models import load_causal_lm, load_tokenizer
from ..common.prompts import read_prompts
from ..common.smollm2 import DEFAULT_DIR, prepare_smollm2
from ..common.strict_json import strict_json
from ..policy.engine import PolicyEngine, Sampling
from ..policy.nucleus import WindowedTopP
from .timing import timed

log = logging.getLogger(__name__)
TOP_P = 0.9
SAVED_ROWS = 64


def nucleus_sizes(logits: torch.Tensor, top_p: float) -> list[int]:
    """Per row, the tokens top-p keeps: the likeliest ones while the mass before them is under top_p."""
    probs = logits.float().softmax(-1).sort(-1, descending=True).values
    return ((probs.cumsum(-1) - probs) < top_p).sum(-1).tolist()


def sampled_logits(model_dir: str, prompts: list[str], samples: int, new_tokens: int, device: torch.device):
    """The logits each sampled response token was drawn from (temperature 1), one row a token."""
    model = load_causal_lm(model_dir, device, "--model")
    engine = PolicyEngine(model, load_tokenizer(model_dir), GrpcConfig(), kv_cache="dynamic")
    batch = engine.generate(prompts, samples, Sampling(temperature=1.0, top_p=TOP_P, max_new_tokens=new_tokens, seed=0))
    rows = []
    with torch.no_grad():
        for prompt, response in zip(batch.prompt_ids, batch.response_ids):
            logits = model(input_ids=torch.tensor([prompt + response], device=device)).logits[0].float()
            rows.append(logits[len(prompt) - 1 : len(prompt) + len(response) - 1])
    return torch.cat(rows), model.config._name_or_path


def time_filters(scores: torch.Tensor, window: int, repeats: int) -> dict:
    """Median milliseconds of one call of each filter on `scores`, and the rows the window sent to the sort."""
    ids, device = torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device), scores.device
    full = [1e3 * timed(device, lambda: TopPLogitsWarper(TOP_P)(ids, scores))[1] for _ in range(repeats)]
    windowed = WindowedTopP(1.0, TOP_P, window)
    by_window = [1e3 * timed(device, lambda: windowed(ids, scores))[1] for _ in range(repeats)]
    return {
        "full_sort_ms": statistics.median(full),
        "window_ms": statistics.median(by_window),
        "speedup": statistics.median(full) / statistics.median(by_window),
        "fallback_share": windowed.fallback_rows / windowed.rows,
    }


def run(logits: torch.Tensor, name: str, device: str, rows: int, window: int, repeats: int) -> dict:
    """Nucleus sizes of `logits` (one row a sampled token) and both filters timed on `device`."""
    torch_device = torch.device(device)
    logits = logits.float().to(torch_device)
    sizes = nucleus_sizes(logits, TOP_P)
    quantiles = statistics.quantiles(sizes, n=100, method="inclusive")  # within the data
    drawn = logits[torch.randint(len(logits), (rows,), generator=torch.Generator().manual_seed(0))]
    flat = torch.randn(rows, logits.shape[1], generator=torch.Generator().manual_seed(1)).to(torch_device) * 0.1
    return {
        "model": name,
        "device": str(torch_device),
        "vocab_size": logits.shape[1],
        "top_p": TOP_P,
        "window": window,
        "nucleus": {
            "rows": len(sizes),
            "median": statistics.median(sizes),
            "p90": quantiles[89],
            "p99": quantiles[98],
            "max": max(sizes),
            "share_within_window": sum(size <= window for size in sizes) / len(sizes),
        },
        "rows": rows,
        "real": time_filters(drawn, window, repeats),
        "flat": time_filters(flat, window, repeats),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--model", default=None, help=f"a causal LM directory (default: {DEFAULT_DIR}, prepared once)")
    parser.add_argument("--logits", default=None, help="time on logits saved by --save-logits, without a model")
    parser.add_argument("--save-logits", default=None, help=f"keep {SAVED_ROWS} rows of the real logits here")
    parser.add_argument("--prompts", default="prompts/default.txt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=256, help="rows a timed filter call takes (the bench's batch)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s top_p_window %(message)s")
    if args.logits:
        logits, name = load_file(args.logits)["logits"], f"{args.logits} (saved logits)"
    else:
        model_dir = args.model or str(prepare_smollm2())
        prompts = read_prompts(args.prompts, "--prompts")
        logits, name = sampled_logits(model_dir, prompts, samples=4, new_tokens=48, device=torch.device(args.device))
    if args.save_logits:
        kept = logits[torch.randperm(len(logits), generator=torch.Generator().manual_seed(2))[:SAVED_ROWS]]
        save_file({"logits": kept.half().cpu().contiguous()}, args.save_logits)
    figures = run(logits, name, args.device, args.rows, args.window, args.repeats)
    pathlib.Path(args.json).write_text(strict_json(figures, indent=2))
    nucleus = figures["nucleus"]
    log.info(
        "%s: nucleus at top-p %.1f over %d sampled tokens: median %s, p99 %.0f, max %d; %.1f %% within %d",
        figures["model"], TOP_P, nucleus["rows"], nucleus["median"], nucleus["p99"], nucleus["max"],
        100 * nucleus["share_within_window"], args.window,
    )  # fmt: skip
    for kind in ("real", "flat"):
        timing = figures[kind]
        log.info(
            "%s logits, %d x %d: full sort %.1f ms, window %.1f ms (%.2fx), %.0f %% of rows sorted after the window",
            kind, args.rows, figures["vocab_size"], timing["full_sort_ms"], timing["window_ms"], timing["speedup"],
            100 * timing["fallback_share"],
        )  # fmt: skip


if __name__ == "__main__":
    main()
