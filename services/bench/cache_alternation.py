"""Rollout batches with canary batches between them, as the policy service runs them (issue #14).

At every new version the policy answers its canaries (a few prompts, greedy, policy.canary_max_new_tokens)
between two rollout batches of another row count. With policy.kv_cache = static the engine holds one
StaticCache, of one batch shape: each switch of shape frees it and allocates another, at another address.
transformers marks the cache's tensors static (torch._dynamo.mark_static_address, unguarded), so the
compiled decode step is not recompiled for a new address of a shape it has seen, but its CUDA graphs are
recorded anew. What that costs, per switch, is what this bench measures: the calls run rollout, rollout,
then (canary, rollout) x --rounds, each timed; a rollout after a canary slower than one after a rollout is
the price of the switch. A randomly initialised model of --size (shapes.py), as services.bench.gpu builds.

    python -m services.bench.cache_alternation --json OUT [--size qwen2.5-1.5b] [--device cuda]
        [--kv-cache static] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import tempfile

import torch

from ..common.config import PolicyConfig
from ..common.strict_json import strict_json
from ..policy.engine import Sampling
from ..policy.kv_cache import KV_CACHE_SETTINGS
from .gpu import DTYPES
from .shapes import SHAPES, random_policy_engine, random_prompts, shape_fields
from .timing import timed

log = logging.getLogger(__name__)
CANARY_MAX_NEW_TOKENS = PolicyConfig.model_fields["canary_max_new_tokens"].default


def call_order(rounds: int) -> list[str]:
    """The calls' kinds in order: two rollouts (the first compiles), then `rounds` canary-rollout pairs."""
    return ["rollout", "rollout"] + ["canary", "rollout"] * rounds


def run_alternation(
    size: str, device: str, dtype: str, kv_cache: str, rows: int, canaries: int, prompt_tokens: int,
    max_new_tokens: int, rounds: int, seed: int = 0,
) -> dict:  # fmt: skip
    """Each call of call_order(rounds) timed, on an engine sampling with kv_cache."""
    torch_device = torch.device(device)
    vocab = shape_fields(size)["vocab_size"]
    batches = {  # kind: (prompts, sampling)
        "rollout": (
            random_prompts(rows, prompt_tokens, vocab, seed),
            Sampling(max_new_tokens=max_new_tokens, seed=seed),
        ),
        "canary": (
            random_prompts(canaries, prompt_tokens, vocab, seed + 1),
            Sampling(temperature=0.0, max_new_tokens=CANARY_MAX_NEW_TOKENS),
        ),
    }
    with tempfile.TemporaryDirectory(prefix="belay-cache-alternation-") as temp:
        _, engine = random_policy_engine(
            size, pathlib.Path(temp) / "base", seed, DTYPES[dtype], torch_device, rows,
            max_prompt_tokens=prompt_tokens, kv_cache=kv_cache,
        )  # fmt: skip
        calls = []
        for kind in call_order(rounds):
            prompts, sampling = batches[kind]
            batch, seconds = timed(torch_device, lambda p=prompts, s=sampling: engine.generate(p, 1, s))
            calls.append({"kind": kind, "rows": len(batch.response_ids), "seconds": seconds})
            log.info("%-7s %4d rows  %7.3f s", kind, len(batch.response_ids), seconds)
        kv_cache = engine.sampling_cache.kind  # auto resolved: what the engine sampled with
    after_rollout = [c["seconds"] for p, c in zip(calls, calls[1:]) if (p["kind"], c["kind"]) == ("rollout", "rollout")]
    after_canary = [c["seconds"] for p, c in zip(calls, calls[1:]) if (p["kind"], c["kind"]) == ("canary", "rollout")]
    return {
        "size": size,
        "device": str(torch_device),
        "device_name": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu",
        "dtype": dtype,
        "kv_cache": kv_cache,
        "max_new_tokens": {"rollout": max_new_tokens, "canary": CANARY_MAX_NEW_TOKENS},
        "calls": calls,
        "rollout_after_rollout_seconds": after_rollout,
        "rollout_after_canary_seconds": after_canary,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the figures")
    parser.add_argument("--size", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--kv-cache", default="static", choices=KV_CACHE_SETTINGS)
    parser.add_argument("--rows", type=int, default=256, help="rows of a rollout batch")
    parser.add_argument("--canaries", type=int, default=8, help="rows of a canary batch")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="every prompt's length, and the prompt limit")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="a rollout's response length")
    parser.add_argument("--rounds", type=int, default=3, help="canary-rollout pairs after the two first rollouts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cache_alternation %(message)s")
    figures = run_alternation(
        args.size, args.device, args.dtype, args.kv_cache, args.rows, args.canaries, args.prompt_tokens,
        args.max_new_tokens, args.rounds,
    )  # fmt: skip
    pathlib.Path(args.json).write_text(strict_json(figures, indent=2))
    log.info(
        "%s %s cache: a rollout after a rollout %s s, after a canary batch %s s",
        args.size,
        args.kv_cache,
        [round(s, 3) for s in figures["rollout_after_rollout_seconds"]],
        [round(s, 3) for s in figures["rollout_after_canary_seconds"]],
    )


if __name__ == "__main__":
    main()
