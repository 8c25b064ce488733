"""The GPU path of `belay bench` (issue #7): Belay's own code on a larger, randomly initialised Llama
in bf16. It measures
- generation: tokens/s of PolicyEngine.generate (sampling with the behaviour log-probs read off the
  sampling passes, as the policy serves a batch), batch x max_new_tokens from random prompts of a
  fixed length, with the KV cache policy.kv_cache names (--kv-cache: auto, i.e. static on CUDA, compiled,
  dynamic elsewhere; or paged, continuous batching under transformers 5, whose behaviour log-probs come
  from a teacher-forced pass timed as logprob_seconds; warm-up calls, compilation included, timed apart);
- the update: seconds of Trainer.update (the seed recipe: batch-mean advantage, k1 KL, clipped PPO,
  forward + backward + AdamW step per minibatch) and its model-FLOPs utilisation
  MFU = 6 * n_params * tokens_processed / seconds / peak_flops, where n_params counts the weights of
  every matrix multiply (nn.Linear, the output head included; the embedding lookup and norms do no
  matmul) and tokens_processed = ppo_epochs * rows * padded width (the tokens the forward passes see);
- the hot swap: PolicyEngine.swap_to from the checkpoint Trainer.save wrote after the update.

    python -m services.bench.gpu --json OUT [--size SHAPE] [--device cuda] [--dtype bf16]   (SHAPE: shapes.py)
        [--kv-cache auto|dynamic|static|paged] [--generation-only] [--profile]

--profile: one more call of PROFILE_STEPS new tokens under torch.profiler (op_profile.py), where a step's time
goes; few, as the profiler's summary takes 16 s for 200,000 events here and a 1.5B step makes thousands.
With a static cache, the call's whole length: a shorter one is another cache shape, compiled anew.

The shapes are in shapes.py (1b is TinyLlama-1.1B's, qwen2.5-* Qwen2.5's). The model is built, saved as
safetensors in a temporary directory with a word-level tokenizer ("w4" .. "wN", one token a word,
so every prompt has exactly --prompt-tokens tokens), and loaded back the way the services load it.
Peak FLOP/s are dense bf16 figures from the vendors' data sheets; on another card, another dtype or
the CPU, MFU is null and the achieved FLOP/s still say how fast the update ran.
"""

from __future__ import annotations

import argparse
import copy as copy_module
import logging
import pathlib
import resource
import sys
import tempfile

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from ..common.config import BelayConfig, PolicyConfig
from ..common.models import load_causal_lm, response_logprobs, weights_fingerprint
from ..common.rollout_queue import Rollout
from ..common.strict_json import strict_json
from ..policy.engine import PolicyEngine, Sampling
from ..policy.kv_cache import KV_CACHE_SETTINGS
from ..trainer.trainer import Trainer
from ..trainer.trainer_metrics import TrainerMetrics
from .op_profile import profile_lines, profile_ops
from .shapes import SHAPES, random_policy_engine, random_prompts, shape_fields
from .timing import timed
from .workload import Workload

log = logging.getLogger(__name__)
PROFILE_STEPS = 16  # new tokens of the profiled call (--profile)
KV_CACHE_DEFAULT = PolicyConfig.model_fields["kv_cache"].default
MAX_PROMPT_TOKENS_DEFAULT = PolicyConfig.model_fields["max_prompt_tokens"].default
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
# (name contains, and also contains, dense bf16 FLOP/s): the first match wins, so PCIe comes before SXM.
PEAK_BF16_FLOPS = [("H100", "PCIe", 756e12), ("H100", "", 989e12), ("H200", "", 989e12), ("A100", "", 312e12)]


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of a card by its torch.cuda.get_device_name(); None when the table lacks it."""
    return next(
        (flops for card, variant, flops in PEAK_BF16_FLOPS if card in device_name and variant in device_name), None
    )


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[str, float | None]:
    """(device name, peak FLOP/s for dtype, or None where there is no figure: the CPU, dtypes other than bf16)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, peak_bf16_flops(name) if dtype == torch.bfloat16 else None


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights of every nn.Linear: the parameters each token multiplies through (2 FLOPs each forward)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def rollouts_from(batch, rewards: np.ndarray) -> list[Rollout]:
    """The trainer's input from a generation batch. The reference is the initial policy, which is
    what sampled, so its log-probs equal the behaviour log-probs."""
    return [
        Rollout(
            prompt_text="",
            response_text=text,
            prompt_ids=np.asarray(prompt, np.int32),
            response_ids=np.asarray(response, np.int32),
            logprobs=np.asarray(logprobs, np.float32),
            ref_logprobs=np.asarray(logprobs, np.float32),
            reward=float(reward),
            policy_version=batch.version,
            finish_reason=reason,
            group_id=str(row),
        )
        for row, (prompt, response, logprobs, text, reason, reward) in enumerate(
            zip(batch.prompt_ids, batch.response_ids, batch.logprobs, batch.texts, batch.finish_reasons, rewards)
        )
    ]


def check_arguments(device: str, dtype: str, iterations: int, warmup: int) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {device} asked for, but torch sees no CUDA device (torch {torch.__version__}); "
            "run on a GPU machine or pass --device cpu"
        )
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got iterations={iterations} warmup={warmup}")


def bench_trainer(
    base: pathlib.Path,
    checkpoints: pathlib.Path,
    device: torch.device,
    dtype: torch.dtype,
    workload: Workload,
    tokenizer,
) -> Trainer:
    """A Trainer on float32 master weights computing under autocast in `dtype`, publishing in it."""
    name = str(dtype).removeprefix("torch.")
    config = BelayConfig.model_validate(
        {
            "run": {"checkpoint_dir": str(checkpoints)},
            "trainer": {
                "model_dir": str(base),
                "batch_size": workload.batch_size,
                "minibatch_size": min(workload.minibatch_size, workload.batch_size),
                "ppo_epochs": workload.ppo_epochs,
                "lr": workload.lr,
                "kl_coef": workload.kl_coef,
                "temperature": workload.temperature,
                "seed": workload.seed,
                "dtype": name,
            },
            "policy": {"temperature": workload.temperature, "dtype": name},
        }
    )
    model = load_causal_lm(str(base), device, "bench trainer")  # float32 master weights
    return Trainer(config, model, tokenizer, queue=None, metrics=TrainerMetrics(CollectorRegistry()))


def measure_generation(
    engine: PolicyEngine, prompts: list[str], workload: Workload, device: torch.device, iterations: int, warmup: int
):
    """Warm-up calls first (CUDA context, kernels, a static cache's compilation), then the measured
    ones. Returns (figures, last batch)."""
    seconds_each, tokens_each, warmup_seconds, logprob_seconds = [], [], [], []
    for call in range(warmup + iterations):
        sampling = Sampling(
            temperature=workload.temperature, max_new_tokens=workload.max_new_tokens, seed=workload.seed + call
        )
        batch, seconds = timed(device, lambda sampling=sampling: engine.generate(prompts, 1, sampling))
        if call >= warmup:
            seconds_each.append(seconds)
            tokens_each.append(sum(len(r) for r in batch.response_ids))
            logprob_seconds.append(batch.logprob_seconds)
        else:
            warmup_seconds.append(seconds)
    figures = {
        "kv_cache": engine.sampling_cache.kind,
        "cache_positions": engine.cache_positions(workload.max_new_tokens),  # what a static cache holds
        "max_prompt_tokens": engine.max_prompt_tokens,
        "rows": len(prompts),
        "max_new_tokens": workload.max_new_tokens,
        "temperature": workload.temperature,
        "top_p": Sampling.top_p,
        "top_p_window": engine.top_p_window,  # a random model's flat rows all spill past it (nucleus.py)
        "warmup_seconds": warmup_seconds,
        "seconds": seconds_each,
        "response_tokens": tokens_each,
        "tokens_per_second": sum(tokens_each) / sum(seconds_each),
        "logprob_seconds": logprob_seconds,  # within seconds: the paged sampler's teacher-forced pass
    }
    return figures, batch


def measure_update(
    trainer: Trainer,
    rollouts: list[Rollout],
    workload: Workload,
    device: torch.device,
    dtype: torch.dtype,
    iterations: int,
    warmup: int,
) -> dict:
    """Trainer.update on one batch, warm-up updates first (optimizer state, kernels); MFU by 6·N·D."""
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    seconds_each = []
    for step in range(warmup + iterations):
        summary, seconds = timed(device, lambda: trainer.update(rollouts))
        if step >= warmup:
            seconds_each.append(seconds)
    n_params = matmul_parameters(trainer.model)
    tokens_processed = workload.ppo_epochs * len(rollouts) * width
    flops = 6 * n_params * tokens_processed
    mean = sum(seconds_each) / len(seconds_each)
    _, peak = peak_flops(device, dtype)
    return {
        "rows": len(rollouts),
        "minibatch_size": trainer.section.minibatch_size,
        "ppo_epochs": workload.ppo_epochs,
        "width": width,
        "tokens_processed": tokens_processed,
        "n_params": n_params,
        "flops": flops,
        "seconds": seconds_each,
        "seconds_mean": mean,
        "achieved_flops_per_second": flops / mean,
        "peak_flops_per_second": peak,
        "mfu": None if peak is None else flops / mean / peak,
        "optimizer_steps": summary.optimizer_steps,
        "skipped_minibatches": summary.skipped_minibatches,
    }


def serving_fingerprint(model: torch.nn.Module, dtype: torch.dtype) -> str:
    """weights_fingerprint of the model's weights cast to the serving dtype (what a policy in it holds)."""
    copy = copy_module.deepcopy(model).to(dtype)
    return weights_fingerprint(copy)


def measure_hot_swap(trainer: Trainer, engine: PolicyEngine, device: torch.device, dtype: torch.dtype) -> dict:
    """The trainer's persisted checkpoint (float32 masters) into the serving engine, in place."""
    checkpoint, checkpoint_seconds = timed(device, lambda: trainer.save(1, []))
    fingerprint_before, version_before = weights_fingerprint(engine.loaded.model), engine.version
    engine_seconds, swap_seconds = timed(device, lambda: engine.swap_to(1, checkpoint))
    return {
        "seconds": swap_seconds,
        "engine_seconds": engine_seconds,
        "checkpoint_write_seconds": checkpoint_seconds,
        "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.glob("model*.safetensors")),
        "version_before": version_before,
        "version_after": engine.version,
        "engine_fingerprint_before": fingerprint_before,
        "engine_fingerprint_after": weights_fingerprint(engine.loaded.model),
        "trainer_fingerprint": serving_fingerprint(trainer.model, dtype),
    }


def measure_training(
    base: pathlib.Path,
    temp: pathlib.Path,
    engine: PolicyEngine,
    batch,
    workload: Workload,
    device: torch.device,
    dtype: torch.dtype,
    iterations: int,
    warmup: int,
) -> dict:
    """The update on the generated batch, then the hot swap of the checkpoint it saves into the engine."""
    trainer = bench_trainer(base, temp / "checkpoints", device, dtype, workload, engine.tokenizer)
    rollouts = rollouts_from(batch, np.random.default_rng(workload.seed).normal(size=workload.batch_size))
    update = measure_update(trainer, rollouts, workload, device, dtype, iterations, warmup)
    hot_swap = measure_hot_swap(trainer, engine, device, dtype)
    return {
        "update": update,
        "checkpoint_write_seconds": hot_swap.pop("checkpoint_write_seconds"),
        "hot_swap": hot_swap,
    }


def profile_generation(engine: PolicyEngine, prompts: list[str], workload: Workload, device: torch.device) -> dict:
    """One more generation call under the profiler, after the measured ones: PROFILE_STEPS new tokens at most,
    a static cache's whole length (a shorter call compiles anew); its figures carry its steps."""
    steps = workload.max_new_tokens
    if engine.sampling_cache.kind != "static":
        steps = min(PROFILE_STEPS, steps)
    sampling = Sampling(temperature=workload.temperature, max_new_tokens=steps, seed=workload.seed)
    return {**profile_ops(device, lambda: engine.generate(prompts, 1, sampling))[1], "steps": steps}


def behaviour_gap(engine: PolicyEngine, batch, temperature: float) -> dict:
    """How far the behaviour log-probs the sampler recorded are from a teacher-forced pass over the
    same tokens on the same weights (one full forward, another kernel): on a GPU, the exactness of the
    KV cache's log-probs (docs/gpu.md)."""
    pad = engine.tokenizer.pad_token_id
    forced = response_logprobs(engine.loaded.model, batch.prompt_ids, batch.response_ids, pad, temperature)
    gaps = torch.cat([(f.float().cpu() - torch.tensor(b)).abs() for f, b in zip(forced, batch.logprobs) if len(b)])
    return {"max_abs": float(gaps.max()), "mean_abs": float(gaps.mean()), "tokens": int(gaps.numel())}


def run_gpu_bench(
    size: str = "1b",
    device: str = "cuda",
    dtype: str = "bf16",
    iterations: int = 3,
    warmup: int = 1,
    prompt_tokens: int = 64,
    workload: Workload | None = None,
    kv_cache: str = KV_CACHE_DEFAULT,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS_DEFAULT,
    generation_only: bool = False,
    profile: bool = False,
) -> dict:
    """Generation, then (unless generation_only) the update and the hot swap, on a random model of
    `size`, in one process. The engine samples as the policy service does with policy.kv_cache =
    kv_cache and policy.max_prompt_tokens = max_prompt_tokens (which sizes a static cache)."""
    workload = workload or Workload()
    check_arguments(device, dtype, iterations, warmup)
    torch_device, torch_dtype = torch.device(device), DTYPES[dtype]
    if torch_device.type == "cpu":
        torch.set_num_threads(workload.torch_threads)
    with tempfile.TemporaryDirectory(prefix="belay-gpu-bench-") as temp:
        base, engine = random_policy_engine(
            size, pathlib.Path(temp) / "base", workload.seed, torch_dtype, torch_device, workload.batch_size,
            max_prompt_tokens=max_prompt_tokens, kv_cache=kv_cache,
        )  # fmt: skip
        prompts = random_prompts(workload.batch_size, prompt_tokens, shape_fields(size)["vocab_size"], workload.seed)
        generation, batch = measure_generation(engine, prompts, workload, torch_device, iterations, warmup)
        generation["behaviour_vs_teacher_forced"] = behaviour_gap(engine, batch, workload.temperature)
        if profile:
            generation["profile"] = profile_generation(engine, prompts, workload, torch_device)
        training = {"update": None, "checkpoint_write_seconds": None, "hot_swap": None}
        if not generation_only:
            training = measure_training(
                base, pathlib.Path(temp), engine, batch, workload, torch_device, torch_dtype, iterations, warmup
            )
    return {
        "size": size,
        "device": str(torch_device),
        "device_name": peak_flops(torch_device, torch_dtype)[0],
        "dtype": str(torch_dtype),
        "model": {
            **shape_fields(size),
            "parameters": sum(p.numel() for p in engine.loaded.model.parameters()),
            "matmul_parameters": matmul_parameters(engine.loaded.model),
        },
        "generation": {**generation, "prompt_tokens": prompt_tokens},
        **training,
        "peak_memory_bytes": {
            "process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device": torch.cuda.max_memory_allocated(torch_device) if torch_device.type == "cuda" else None,
        },
        "iterations": iterations,
        "warmup": warmup,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="where the figures are written")
    parser.add_argument("--size", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=Workload.prompts_per_batch)
    parser.add_argument("--max-new-tokens", type=int, default=Workload.max_new_tokens)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--kv-cache", choices=KV_CACHE_SETTINGS, default=KV_CACHE_DEFAULT, help="policy.kv_cache")
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=MAX_PROMPT_TOKENS_DEFAULT,
        help="the engine's policy.max_prompt_tokens (a static cache holds it + max_new_tokens positions)",
    )
    parser.add_argument("--generation-only", action="store_true", help="measure generation; no update, no swap")
    parser.add_argument("--profile", action="store_true", help="profile one more generation call, op by op")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s gpu_bench %(message)s")
    workload = Workload(prompts_per_batch=args.batch, max_new_tokens=args.max_new_tokens)
    figures = run_gpu_bench(
        args.size, args.device, args.dtype, args.iterations, args.warmup, args.prompt_tokens, workload,
        args.kv_cache, args.max_prompt_tokens, args.generation_only, args.profile,
    )  # fmt: skip
    pathlib.Path(args.json).write_text(strict_json(figures, indent=2))
    generation = figures["generation"]
    log.info(
        "%s %s on %s, %s KV cache: generation %.1f tokens/s (first call %.1f s) -> %s",
        args.size,
        figures["dtype"],
        figures["device_name"],
        args.kv_cache,
        generation["tokens_per_second"],
        generation["warmup_seconds"][0] if generation["warmup_seconds"] else float("nan"),
        args.json,
    )
    for line in profile_lines(generation["profile"], generation["profile"]["steps"]) if "profile" in generation else []:
        log.info("%s", line)
    if figures["update"] is not None:
        log.info(
            "update %.3f s (MFU %s), hot swap %.3f s",
            figures["update"]["seconds_mean"],
            figures["update"]["mfu"],
            figures["hot_swap"]["seconds"],
        )


if __name__ == "__main__":
    main()
