"""The whole services stack on one GPU (issue #14): redis-server, policy, reference, reward and
trainer as separate processes, every model on the same device in bfloat16 (the trainer: float32
master weights under bfloat16 autocast), on a randomly initialised model of a given shape (no
weights can be fetched on a GPU machine), with the reward a sequence classifier of the same shape.

    python -m services.bench.gpu_stack --json OUT [--shape qwen2.5-1.5b] [--rows 256] [--steps 3]
        [--kv-cache dynamic|static|paged] [--transport file|broadcast|cuda_ipc] [--minibatch 64]

It prints, from the trainer's step records after the warm-up step: generation tokens/s (the
policy's sampling with its behaviour log-probs, on the KV cache --kv-cache names), reference and
reward seconds, update seconds and MFU (6 * matmul parameters * trained tokens / seconds, against
989 TFLOP/s dense bf16 and against the ~790 TFLOP/s an 8192^3 bf16 matmul measures on the H200),
publish and swap seconds, end-to-end samples/s and tokens/s over the measured window, and peak GPU
memory per service: nvidia-smi's per-process figure (CUDA context and the allocator's unused cache
included), the CUDA allocator's own peak (belay_device_memory_peak_allocated_bytes, read from each
service's /metrics before the stack stops) and the memory plan's figure, to check the plan against. The overlap is
Belay's default (max_staleness 1). On an H200 with a 1.5B shape it takes about 4 minutes, start-up
included."""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families

from ..common.config import BelayConfig
from ..common.memory_check import config_plans, memory_check
from ..common.step_records import StepRecord
from ..common.strict_json import strict_json
from ..launcher import follow
from ..local_stack import SERVICES, LocalStack
from ..policy.kv_cache import KV_CACHE_SETTINGS, resolve_kv_cache
from .gpu import KV_CACHE_DEFAULT, matmul_parameters
from .reward_model import ensure_reward_model
from .shapes import SHAPES, build_random_model, random_prompts, shape_fields
from .workload import Workload, belay_config

PEAK_DENSE_BF16 = 989e12  # H100/H200 SXM data sheet
MEASURED_MATMUL_BF16 = 790e12  # an 8192^3 bf16 matmul on this project's H200 (KINDS.md: 769-798)
TARGETS = {  # issue #14, one H200, the 1.5B shape
    "generation_tokens_per_second": 15000,
    "update_mfu": 0.30,
    "publish_plus_swap_seconds": 1.0,
    "end_to_end_tokens_per_second": 3000,
}


def stack_config(
    workload: Workload,
    run_dir: pathlib.Path,
    device: str,
    dtype: str,
    kv_cache: str = KV_CACHE_DEFAULT,
    transport: str = "file",
    prompt_tokens: int = 64,
) -> BelayConfig:
    """belay bench's config (one actor batch is one trainer batch; overlap on) with every model on
    `device` in `dtype`, the persist cadence past the run (it persists once, at the end), the
    policy sampling with policy.kv_cache = kv_cache."""
    data = belay_config(workload, run_dir, max_staleness=1).model_dump()
    for section in ("policy", "reference", "reward", "trainer"):
        data[section].update(device=device, dtype=dtype, torch_threads=4)
    data["policy"]["kv_cache"] = kv_cache
    data["trainer"]["weight_transport"] = transport  # cuda_ipc: the trainer's device buffers, on one GPU
    data["trainer"]["checkpoint_every_steps"] = 1000
    # The lengths the memory plan reads (and a static cache is sized by): the prompts' own, not the
    # defaults' 1024-token prompts and 4096-token reward inputs. With those the plans summed past the
    # H200 and each service's memory cap shrank with them: the reference died at 3.5 GiB (2026-11-30).
    data["policy"]["max_prompt_tokens"] = prompt_tokens
    data["reward"]["max_length"] = prompt_tokens + workload.max_new_tokens + 64
    data["grpc"]["max_batch_size"] = max(256, workload.batch_size)
    # Published weights go to /dev/shm where it can hold three versions (a container's is often 64 MB).
    serving_bytes = 2 * sum(f.stat().st_size for f in pathlib.Path(workload.model_dir).glob("*.safetensors"))
    if not pathlib.Path("/dev/shm").is_dir() or shutil.disk_usage("/dev/shm").free < 3 * serving_bytes:
        data["run"]["publish_dir"] = str(run_dir / "published")
    return BelayConfig.model_validate(data)


class GpuMemory:
    """Polls nvidia-smi's per-process GPU memory every second; keeps each pid's peak."""

    def __init__(self):
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            for line in out.splitlines():
                pid, used = (field.strip() for field in line.split(","))
                if pid.isdigit() and used.isdigit():
                    self.peaks[int(pid)] = max(self.peaks.get(int(pid), 0), int(used) * 2**20)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def scraped_total(address: str, port: int, name: str) -> float | None:
    """The sum of a metric's samples on a service's /metrics; None when it has none or cannot be read."""
    try:
        text = urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return None
    samples = [s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples]
    return sum(samples) if samples else None


def allocator_peaks(config: BelayConfig) -> dict[str, int]:
    """Each service's CUDA allocator peak (belay_device_memory_peak_allocated_bytes), while it runs."""
    peaks = {}
    for name in SERVICES:
        port = getattr(config, name).metrics_port
        peak = scraped_total(config.run.metrics_address, port, "belay_device_memory_peak_allocated_bytes")
        if peak is not None:
            peaks[name] = int(peak)
    return peaks


def run_stack(
    config: BelayConfig, run_dir: pathlib.Path, steps: int, say, started: float
) -> tuple[list[StepRecord], dict[str, dict[str, int]]]:
    """The raw step records of `steps` trainer steps, and per service its peak GPU bytes by nvidia-smi,
    by the CUDA allocator, and in the memory plan (CUDA context included)."""
    stack = LocalStack(config, run_dir, say=lambda *_: None)
    with GpuMemory() as memory:
        try:
            stack.start()
            stack.wait_healthy(600)
            say(f"stack healthy in {time.perf_counter() - started:.0f} s")
            records = follow(config, stack, steps, say=lambda line: say("  " + line))
            pids = {name: process.popen.pid for name, process in stack.processes.items()}
            allocated = allocator_peaks(config)  # before stop(): the services must still serve /metrics
        finally:
            stack.stop()
    return records, {
        "nvidia_smi": {name: memory.peaks[pid] for name, pid in pids.items() if pid in memory.peaks},
        "allocator": allocated,
        "plan": {plan.service: plan.total_bytes for plan in config_plans(config, torch.cuda.is_available())[0]},
    }


def figures(
    records: list[StepRecord], warmup: int, workload: Workload, matmul_parameters: int, prompt_tokens: int
) -> dict:
    """The bench's figures from the trainer's step records (seconds per stage, end times)."""
    measured = records[warmup:]

    def mean(key: str) -> float:
        return sum(getattr(r.seconds, key) for r in measured) / len(measured)

    tokens = [r.stats.response_length_mean * r.rollouts for r in measured]
    trained_tokens = [r.rollouts * (prompt_tokens + r.stats.response_length_mean) for r in measured]
    window = measured[-1].time - records[warmup - 1].time
    update = mean("update")
    flops = 6 * matmul_parameters * workload.ppo_epochs * sum(trained_tokens) / len(measured)
    return {
        "steps_measured": len(measured),
        "rollouts_per_step": sum(r.rollouts for r in measured) / len(measured),
        "generation_tokens_per_second": sum(tokens) / sum(r.seconds.generate for r in measured),
        "behaviour_logprob_seconds": mean("logprobs"),
        "generate_seconds": mean("generate"),
        "reference_seconds": mean("reference"),
        "reward_seconds": mean("reward"),
        "update_seconds": update,
        "update_flops": flops,
        "update_mfu_vs_989": flops / update / PEAK_DENSE_BF16,
        "update_mfu_vs_measured_790": flops / update / MEASURED_MATMUL_BF16,
        "publish_seconds": mean("publish"),
        "swap_seconds": mean("swap"),
        "publish_plus_swap_seconds": mean("publish") + mean("swap"),
        "end_to_end_samples_per_second": sum(r.rollouts for r in measured) / window,
        "end_to_end_tokens_per_second": sum(tokens) / window,
        "window_seconds": window,
    }


def verdicts(result: dict) -> dict:
    """Each issue #14 target against its figure (the ratio figure/target; below 1 is a miss,
    except for seconds, where above 1 is)."""
    out = {}
    for key, target in TARGETS.items():
        value = result["update_mfu_vs_989"] if key == "update_mfu" else result[key]
        ratio = value / target
        met = ratio <= 1 if key.endswith("seconds") else ratio >= 1
        out[key] = {"figure": value, "target": target, "ratio": ratio, "met": met}
    return out


def prepare(shape: str, temp: pathlib.Path, workload: Workload, prompt_tokens: int) -> tuple[Workload, int]:
    """The random policy (bf16 safetensors), its same-shape reward classifier and the prompts file."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = build_random_model(shape, temp / "policy", workload.seed, torch.bfloat16, device)
    reward_dir = ensure_reward_model(model_dir, temp / "reward", workload.seed)
    prompts = random_prompts(workload.prompts_per_batch, prompt_tokens, shape_fields(shape)["vocab_size"], 0)
    (temp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    with torch.device("meta"):
        config_class, model_class, fields = SHAPES[shape]
        meta = model_class(config_class(**fields))
    matmul = matmul_parameters(meta)
    workload = Workload(
        model_dir=str(model_dir),
        reward_dir=str(reward_dir),
        prompts_file=str(temp / "prompts.txt"),
        prompts_per_batch=workload.prompts_per_batch,
        max_new_tokens=workload.max_new_tokens,
        minibatch_size=workload.minibatch_size,
        lr=workload.lr,
        warmup=workload.warmup,
        iterations=workload.iterations,
    )
    return workload, matmul


def refuse_what_cannot_fit(config: BelayConfig, say) -> None:
    """As `belay up` does before starting: print the memory plan, and stop on one that cannot fit (each
    service would otherwise start capped to its share of an oversubscribed card, and fail inside)."""
    report, refused = memory_check(config)
    say(report)
    if refused:
        raise SystemExit(refused)


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.bench.gpu_stack", description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="where the figures are written")
    parser.add_argument("--shape", default="qwen2.5-1.5b", help="a shape of services/bench/shapes.py")
    parser.add_argument("--rows", type=int, default=256, help="prompts per batch: sequences in flight")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--minibatch",
        type=int,
        default=64,
        help="rows per optimizer step (64 ran out of memory at 1.5B on the H200 before log-probs were chunked)",
    )
    parser.add_argument("--steps", type=int, default=3, help="measured trainer steps (after one warm-up step)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--transport", choices=("file", "broadcast", "cuda_ipc"), default="file")
    parser.add_argument("--kv-cache", choices=KV_CACHE_SETTINGS, default=KV_CACHE_DEFAULT, help="policy.kv_cache")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device (pass --device cpu on a CPU machine)")
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    workload = Workload(
        prompts_per_batch=args.rows,
        max_new_tokens=args.max_new_tokens,
        minibatch_size=args.minibatch,
        warmup=1,
        iterations=args.steps,
        lr=1e-6,
    )
    with tempfile.TemporaryDirectory(prefix="belay-gpu-stack-") as temp:
        workload, matmul = prepare(args.shape, pathlib.Path(temp), workload, args.prompt_tokens)
        say(f"{args.shape}: models built in {time.perf_counter() - started:.0f} s")
        config = stack_config(
            workload,
            pathlib.Path(temp) / "run",
            args.device,
            args.dtype,
            args.kv_cache,
            args.transport,
            args.prompt_tokens,
        )
        refuse_what_cannot_fit(config, say)
        records, peaks = run_stack(config, pathlib.Path(temp) / "run", 1 + args.steps, say, started)
    result = figures(records, 1, workload, matmul, args.prompt_tokens)
    result |= {
        "shape": args.shape,
        "matmul_parameters": matmul,
        "rows": args.rows,
        "prompt_tokens": args.prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "minibatch": args.minibatch,
        "dtype": args.dtype,
        "kv_cache": resolve_kv_cache(args.kv_cache, args.device),  # what the policy samples with
        "transport": args.transport,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "peak_gpu_memory_bytes": peaks,
        "wall_seconds": time.perf_counter() - started,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
        "steps": [json.loads(record.to_json()) for record in records],  # as the trainer wrote them
    }
    result["targets"] = verdicts(result)
    pathlib.Path(args.json).write_text(strict_json(result, indent=2))
    say(format_result(result))


def gib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**30:.1f}"


def format_result(result: dict) -> str:
    """The result for a person: its figures, peak GPU memory per service, each target's verdict."""
    lines = [
        f"{result['shape']} on {result['device_name']} ({result['dtype']}, {result['kv_cache']} KV cache), "
        f"{result['rows']} rows x {result['max_new_tokens']} new tokens, {result['steps_measured']} measured steps:"
    ]
    for key in (
        "generation_tokens_per_second",
        "generate_seconds",
        "reference_seconds",
        "reward_seconds",
        "update_seconds",
        "update_mfu_vs_989",
        "update_mfu_vs_measured_790",
        "publish_seconds",
        "swap_seconds",
        "end_to_end_samples_per_second",
        "end_to_end_tokens_per_second",
    ):
        lines.append(f"  {key:32s} {result[key]:.4g}")
    peaks = result["peak_gpu_memory_bytes"]
    for name, peak in peaks["nvidia_smi"].items():
        allocated, plan = gib(peaks["allocator"].get(name)), gib(peaks["plan"].get(name))
        lines.append(f"  peak GPU memory {name:16s} {gib(peak)} GiB (nvidia-smi), allocator {allocated}, plan {plan}")
    for key, verdict in result["targets"].items():
        state = "met" if verdict["met"] else "MISSED"
        lines.append(
            f"  target {key}: {verdict['figure']:.4g} vs {verdict['target']} ({verdict['ratio']:.2f}x) {state}"
        )
    lines.append(f"  wall {result['wall_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
