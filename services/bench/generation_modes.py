"""Generation on CUDA three ways, on a random model of a given shape (issue #14): what plain
`generate()` (Belay's engine today) leaves on the table against a static KV cache with
`torch.compile`, and against transformers' continuous batching with paged attention.

    python -m services.bench.generation_modes --json OUT --shape qwen2.5-1.5b --mode generate|static|continuous

One mode a process (a compiled or CUDA-graphed model keeps its state). Each mode samples the same
prompts (temperature 1, top_p 0.9) for max_new_tokens; the first call (compilation, graph capture,
allocation) is timed apart from the measured ones. A random model rarely samples EOS, so every row
runs to max_new_tokens and tokens/s compare like with like. None of these modes reads behaviour
log-probs: the engine, which reads them off the sampling passes (a logits processor, one row per
sequence), is measured by `services.bench.gpu --generation-only --kv-cache dynamic|static|paged` on the same
rows and lengths (stack_bench.sh's `engine` stage); `teacher_forced_seconds` is what a separate exact
log-prob pass over the generated rows costs, the price any mode pays whose sampler cannot hand its
log-probs back (continuous batching packs the rows of many sequences into each step, which that
recorder, one row per sequence, does not follow)."""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from ..common.models import response_logprobs
from ..common.strict_json import strict_json
from ..policy.paged_sampling import sample_paged
from .shapes import build_random_model, random_prompts, shape_fields
from .timing import timed

MODES = ("generate", "static", "continuous")


def sampling_config(tokenizer, max_new_tokens: int, **extra) -> GenerationConfig:
    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=0.9,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def padded_generate(model, tokenizer, prompts: list[str], config: GenerationConfig) -> list[list[int]]:
    """generate() on left-padded prompts; the new tokens of each row."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False).to(model.device)
    output = model.generate(**batch, generation_config=config)
    return output[:, batch["input_ids"].shape[1] :].tolist()


def continuous_generate(model, tokenizer, prompts: list[str], config: GenerationConfig) -> list[list[int]]:
    """The engine's paged sampler (policy.kv_cache = paged) without its log-prob pass."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    return sample_paged(model, ids, config, max_tokens_per_forward=16384)


def run_mode(mode: str, model_dir: pathlib.Path, prompts: list[str], max_new_tokens: int, repeats: int) -> dict:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    # transformers 5's generate_batch switches the model to "paged|sdpa" for the call by itself
    attention = "paged|sdpa" if mode == "continuous" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    if mode == "static":
        config = sampling_config(tokenizer, max_new_tokens, cache_implementation="static")
    else:
        config = sampling_config(tokenizer, max_new_tokens)
    run = continuous_generate if mode == "continuous" else padded_generate
    with torch.no_grad():
        _, first_seconds = timed(model.device, lambda: run(model, tokenizer, prompts, config))
        seconds, tokens = [], []
        for _ in range(repeats):
            rows, elapsed = timed(model.device, lambda: run(model, tokenizer, prompts, config))
            seconds.append(elapsed)
            tokens.append(sum(len(row) for row in rows))
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    _, teacher_forced = timed(model.device, lambda: response_logprobs(model, prompt_ids, rows, tokenizer.pad_token_id))
    return {
        "mode": mode,
        "attn_implementation": attention,
        "first_call_seconds": first_seconds,
        "seconds": seconds,
        "response_tokens": tokens,
        "tokens_per_second": sum(tokens) / sum(seconds),
        "teacher_forced_seconds": teacher_forced,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.bench.generation_modes", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--shape", default="qwen2.5-1.5b")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--rows", type=int, default=256, help="sequences in flight")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("generation_modes measures CUDA generation; torch sees no CUDA device")
    vocab = shape_fields(args.shape)["vocab_size"]
    prompts = random_prompts(args.rows, args.prompt_tokens, vocab, seed=0)
    with tempfile.TemporaryDirectory(prefix="belay-genmodes-") as temp:
        model_dir = build_random_model(args.shape, pathlib.Path(temp), 0, torch.bfloat16, "cuda")
        figures = run_mode(args.mode, model_dir, prompts, args.max_new_tokens, args.repeats)
    figures |= {
        "shape": args.shape,
        "rows": args.rows,
        "prompt_tokens": args.prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "device_name": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    pathlib.Path(args.json).write_text(strict_json(figures, indent=2))
    print(
        f"{args.shape} {args.mode}: {figures['tokens_per_second']:.0f} tokens/s ({args.rows} rows x "
        f"{args.max_new_tokens} new tokens), first call {figures['first_call_seconds']:.1f} s, teacher-forced "
        f"log-probs {figures['teacher_forced_seconds']:.2f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
