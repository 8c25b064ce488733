"""Hot-swap time on the embedded SmolLM2-135M: a full-weight checkpoint against a LoRA adapter.

    .venv/bin/python -m services.bench.hot_swap [--repeats 5] [--rank 8]

Prints the median and range of PolicyEngine.swap_to for each kind, and the checkpoint sizes.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile

import torch

from services.common.checkpoints import write_checkpoint
from services.common.config import GrpcConfig
from services.common.lora import LoraSettings, save_adapter, wrap_with_lora
from services.common.models import load_causal_lm, load_tokenizer
from services.common.smollm2 import prepare_smollm2
from services.policy.engine import PolicyEngine


def size_mb(directory: pathlib.Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 2**20


def time_swaps(engine: PolicyEngine, checkpoints: list[pathlib.Path]) -> list[float]:
    return [engine.swap_to(version, path) for version, path in enumerate(checkpoints, start=1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    base_dir = str(prepare_smollm2())
    tokenizer = load_tokenizer(base_dir)
    settings = LoraSettings(r=args.rank, alpha=2 * args.rank)
    with tempfile.TemporaryDirectory() as scratch:
        root = pathlib.Path(scratch)
        trained = load_causal_lm(base_dir, torch.device("cpu"), "bench")
        full = [
            write_checkpoint(
                root / "full", v, lambda d, model=trained: model.save_pretrained(d, safe_serialization=True)
            )
            for v in range(1, args.repeats + 1)
        ]
        adapted = wrap_with_lora(load_causal_lm(base_dir, torch.device("cpu"), "bench"), settings)
        adapters = [
            write_checkpoint(root / "lora", v, lambda d, model=adapted: save_adapter(model, d))
            for v in range(1, args.repeats + 1)
        ]
        del trained, adapted
        results = {}
        engine = PolicyEngine(load_causal_lm(base_dir, torch.device("cpu"), "policy"), tokenizer, GrpcConfig())
        results["full weights"] = (time_swaps(engine, full), size_mb(full[0]))
        del engine
        engine = PolicyEngine(
            wrap_with_lora(load_causal_lm(base_dir, torch.device("cpu"), "policy"), settings),
            tokenizer,
            GrpcConfig(),
        )
        results[f"LoRA r={args.rank} adapter"] = (time_swaps(engine, adapters), size_mb(adapters[0]))
    print(f"hot-swap on SmolLM2-135M-Instruct, CPU, torch threads {torch.get_num_threads()}, {args.repeats} swaps each")
    for kind, (seconds, megabytes) in results.items():
        print(
            f"  {kind:22s} median {statistics.median(seconds) * 1000:8.1f} ms  "
            f"(min {min(seconds) * 1000:.1f}, max {max(seconds) * 1000:.1f})  checkpoint {megabytes:.1f} MB"
        )


if __name__ == "__main__":
    main()
