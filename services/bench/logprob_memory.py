"""Peak memory of the trainer's log-prob computation: today's full path against the chunked one (issue #14).

One forward and backward of loss = masked mean of the chosen log-probs + 0.01 x masked mean of the
entropy (what a PPO step asks of the head), on a randomly initialised model of a bench shape:
- full: the model's logits (B, T, V), a float32 log_softmax over all of them (as
  models.next_token_log_probs computes it), the chosen tokens' gather and -sum(exp(lp) * lp);
- chunked: token_logprobs.model_response_stats, the head at response positions only, chunk_positions
  rows at a time, each chunk checkpointed.

    python -m services.bench.logprob_memory [--shape qwen2.5-0.5b] [--vocab-size V] [--batch 8]
        [--prompt-tokens 256] [--response-tokens 256] [--chunk-positions 1024] [--device auto]
        [--dtype bf16] [--json OUT]

Peak extra memory is what the step adds above the model (weights, and on the second path nothing
else: parameter gradients are freed between paths). On CUDA: torch.cuda.max_memory_allocated minus
memory_allocated before the step, both paths in this process. On the CPU each path runs in a child
process of its own and the figure is the kernel's peak resident set (VmHWM, reset through
/proc/self/clear_refs once the model is built) minus the resident set then, so memory the allocator
kept from one path cannot hide the other's peak. Runs on the CPU with the `tiny` shape in seconds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import torch

from ..common.strict_json import strict_json
from ..common.token_logprobs import model_response_stats
from .shapes import SHAPES, shape_fields

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PATHS = ("full", "chunked")


def build_model(shape: str, vocab_size: int | None, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A randomly initialised model of a bench shape (shapes.py), its vocabulary optionally resized,
    in dtype on device, training mode."""
    config_class, model_class, fields = SHAPES[shape][0], SHAPES[shape][1], dict(shape_fields(shape))
    fields["vocab_size"] = vocab_size or fields["vocab_size"]
    torch.manual_seed(0)
    with torch.device(device):
        return model_class(config_class(**fields)).to(dtype).train()


def random_batch(vocab: int, batch: int, prompt_tokens: int, response_tokens: int, device: torch.device):
    """input_ids (B, T), attention_mask (B, T), response_mask (B, T-1): equal-length rows, T = P + R."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, vocab, (batch, prompt_tokens + response_tokens), generator=generator)
    response_mask = torch.zeros((batch, prompt_tokens + response_tokens - 1))
    response_mask[:, prompt_tokens - 1 :] = 1.0
    return input_ids.to(device), torch.ones_like(input_ids).to(device), response_mask.to(device)


def step(path: str, model, input_ids, attention_mask, response_mask, chunk_positions: int) -> torch.Tensor:
    """One forward + backward of the loss on either path; returns the chosen log-probs (B, T-1), detached."""
    if path == "full":
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V) float32
        chosen = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    else:
        stats, _ = model_response_stats(model, input_ids, attention_mask, response_mask, 1.0, chunk_positions)
        chosen, entropy = stats.logprobs, stats.entropy
    count = response_mask.sum()
    loss = (chosen * response_mask).sum() / count + 0.01 * (entropy * response_mask).sum() / count
    loss.backward()
    return chosen.detach()


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (the CPU measurement needs Linux)")


def measure(path: str, model, batch, chunk_positions: int, device: torch.device) -> dict:
    """Peak extra bytes and seconds of one step on `path` (model already built)."""
    input_ids, attention_mask, response_mask = batch
    # A step on 16 tokens of one row first: one-time initialisation (kernels, workspaces) is not the path's.
    warm_mask = torch.ones_like(response_mask[:1, :15])  # every position a response one: the head runs
    step(path, model, input_ids[:1, :16], attention_mask[:1, :16], warm_mask, chunk_positions)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
        before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    chosen = step(path, model, *batch, chunk_positions)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_kib("VmHWM") * 1024
    seconds = time.perf_counter() - start
    keep = batch[2].bool()
    return {"peak_extra_bytes": peak - before, "seconds": seconds, "chosen": chosen[keep].float().cpu().tolist()}


def run_path_in_child(path: str, argv: list[str]) -> dict:
    """The CPU measurement of one path, in a fresh process (so the other path's freed memory is not reused)."""
    command = [sys.executable, "-m", "services.bench.logprob_memory", *argv, "--only", path]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the {path} path failed in its child process:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--vocab-size", type=int, help="resize the shape's vocabulary (e.g. 151936 on a tiny shape)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--chunk-positions", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--json", type=pathlib.Path, help="also write the summary here")
    parser.add_argument("--only", choices=PATHS, help=argparse.SUPPRESS)  # the CPU child's one path
    return parser.parse_args(argv)


def summary(args: argparse.Namespace, device: torch.device, dtype_name: str, results: dict) -> dict:
    """The two paths side by side, with the sizes that explain them (bytes) and their agreement."""
    vocab = args.vocab_size or shape_fields(args.shape)["vocab_size"]
    positions = args.batch * (args.prompt_tokens + args.response_tokens - 1)
    full, chunked = results["full"], results["chunked"]
    difference = max((abs(a - b) for a, b in zip(full.pop("chosen"), chunked.pop("chosen"))), default=0.0)
    return {
        "shape": args.shape,
        "vocab_size": vocab,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype_name,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "response_tokens": args.response_tokens,
        "chunk_positions": args.chunk_positions,
        "full_log_softmax_bytes": positions * vocab * 4,  # one float32 (B, T-1, V): the full path makes several
        "chunk_logits_bytes": min(args.chunk_positions, args.batch * args.response_tokens) * vocab * 4,
        "full": full,
        "chunked": chunked,
        "peak_ratio_full_over_chunked": full["peak_extra_bytes"] / max(chunked["peak_extra_bytes"], 1),
        "max_abs_difference_chosen_logprobs": difference,
    }


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto_device if args.device == "auto" else args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu" and args.only is None:
        results = {path: run_path_in_child(path, argv) for path in PATHS}
    else:
        model = build_model(args.shape, args.vocab_size, DTYPES[dtype_name], device)
        batch = random_batch(model.config.vocab_size, args.batch, args.prompt_tokens, args.response_tokens, device)
        paths = (args.only,) if args.only else PATHS
        results = {path: measure(path, model, batch, args.chunk_positions, device) for path in paths}
        if args.only:
            print(strict_json(results[args.only]))
            return None
    report = summary(args, device, dtype_name, results)
    print(strict_json(report, indent=2))
    if args.json:
        args.json.write_text(strict_json(report, indent=2))
    return report


if __name__ == "__main__":
    main()
