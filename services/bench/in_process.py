"""The bench's in-process mode: the same workload and the same functions as the services
(PolicyEngine.generate, response_logprobs on the frozen reference, the reward backend's score,
build_rollouts, Trainer.update, Trainer.persist), in one process with no RPC and no queue.

One model is both the policy and the trainer's: an update is already in the weights the next
batch samples with, so there is nothing to publish and no hot-swap (both reported as 0). The full
checkpoint is persisted at the services' cadence (every workload.checkpoint_every_steps updates,
in the background through the trainer's Persister), and the last persist is waited for at the end.

Run as `python -m services.bench.in_process --workload W.json --run-dir D --json OUT` so that the
process's peak memory is this mode's alone."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import time

import torch
from prometheus_client import CollectorRegistry
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..common.checkpoints import checkpoint_bytes, committed_versions
from ..common.config import BelayConfig
from ..common.logprob_service import LoadedModel
from ..common.models import freeze, load_causal_lm, load_tokenizer, resolve_device, response_logprobs
from ..common.prompt_data import load_prompt_data
from ..common.rollout_queue import Rollout
from ..common.strict_json import strict_json
from ..policy.actor import build_rollouts
from ..policy.engine import GenerationBatch, PolicyEngine, Sampling
from ..policy.prompt_stream import PromptStream
from ..reward.backends import RewardBackend, build_backend, check_scores
from ..trainer.publishing import serving_tensors
from ..trainer.trainer import Trainer
from ..trainer.trainer_metrics import TrainerMetrics
from .bench_step import BenchStep
from .workload import Workload, belay_config


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM, Linux)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


@dataclasses.dataclass
class OneProcess:
    """What the one process holds: the model that is both the policy and the trainer's, the engine
    that samples from it, the trainer, the frozen reference and the reward backend."""

    config: BelayConfig
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    engine: PolicyEngine
    trainer: Trainer
    reference: PreTrainedModel
    reward: RewardBackend
    prompts: PromptStream
    writes: dict[int, float]  # seconds of each background write, by version


def load_one_process(workload: Workload, run_dir: pathlib.Path) -> OneProcess:
    torch.set_num_threads(workload.torch_threads)
    config = belay_config(workload, run_dir)
    device = resolve_device(config.policy.device)
    torch.manual_seed(config.trainer.seed)
    tokenizer = load_tokenizer(workload.model_dir)
    model = load_causal_lm(workload.model_dir, device, "policy")
    engine = PolicyEngine(model, tokenizer, config.grpc)
    trainer = Trainer(config, model, tokenizer, queue=None, metrics=TrainerMetrics(CollectorRegistry()))
    writes: dict[int, float] = {}

    def persisted(seconds: float, observe=trainer.persister.on_persisted) -> None:
        observe(seconds)
        writes[trainer.persister.persisted_version] = seconds

    trainer.persister.on_persisted = persisted
    reference = freeze(load_causal_lm(workload.model_dir, device, "reference"))
    reward = build_backend(config.reward, resolve_device(config.reward.device))
    prompts = PromptStream.from_data(load_prompt_data(config), config)
    return OneProcess(config, tokenizer, model, engine, trainer, reference, reward, prompts, writes)


def run_in_process(workload: Workload, run_dir: pathlib.Path) -> dict:
    """warmup + iterations PPO steps; the raw run in the services mode's shape."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    one = load_one_process(workload, run_dir)
    records, started = [], []
    for step in range(workload.warmup + workload.iterations):
        started.append(time.time())
        records.append(ppo_step(one, step, started[-1]))
    waited_at_end = one.trainer.persister.wait()  # the last persist, if one is in flight: after the measured window
    start = records[workload.warmup - 1].end_time if workload.warmup else started[0]
    return raw_run(workload, one, records, start, waited_at_end)


def sample_and_score(one: OneProcess, step: int, started_at: float) -> tuple[list[Rollout], GenerationBatch, dict]:
    """A batch generated, scored by the reference and the reward in turn, and made into rollouts.
    Returns (rollouts, the batch, the reference's and the reward's seconds)."""
    policy = one.config.policy
    prompts = one.prompts.take(policy.prompts_per_batch)
    sampling = Sampling(
        temperature=policy.temperature,
        top_p=policy.top_p,
        max_new_tokens=policy.max_new_tokens,
        seed=policy.seed + step,
    )
    batch = one.engine.generate([row.chat for row in prompts], policy.samples_per_prompt, sampling)
    clock = time.perf_counter()
    ref_rows = response_logprobs(
        one.reference,
        batch.prompt_ids,
        batch.response_ids,
        one.tokenizer.pad_token_id,
        policy.temperature,
        one.config.reference.max_tokens_per_forward,
    )
    reference_seconds, clock = time.perf_counter() - clock, time.perf_counter()
    scores = check_scores(
        one.reward.score([prompts[i].text for i in batch.prompt_index], batch.texts),
        len(batch.texts),
        f"reward backend {one.reward.model_id}",
    )
    reward_seconds = time.perf_counter() - clock
    timings = {
        "generate": batch.generate_seconds,
        "logprobs": batch.logprob_seconds,
        "reference": reference_seconds,
        "reward": reward_seconds,
        "started_at": started_at,
    }
    rollouts = build_rollouts(
        batch,
        prompts,
        [(row.numpy(), None, None) for row in ref_rows],
        scores,
        [{} for _ in scores],
        one.reward.model_id,
        timings,
        policy.samples_per_prompt,
    )
    return rollouts, batch, {"reference": reference_seconds, "reward": reward_seconds}


def ppo_step(one: OneProcess, step: int, started_at: float) -> BenchStep:
    """One step: sample and score a batch, update on it, persist when due. Returns its raw record."""
    trainer = one.trainer
    rollouts, batch, scored = sample_and_score(one, step, started_at)
    clock = time.perf_counter()
    summary = trainer.update(rollouts)
    update_seconds = time.perf_counter() - clock
    version = trainer.version + 1
    trainer.version = version
    trainer.lineage.advance(version)
    trainer.consumed_ids.extend(r.rollout_id for r in rollouts)
    # No publish: the one model already holds the update. Persist at the services' cadence: the
    # snapshot here (critical path, with any wait for the previous persist), the write in the background.
    trainer.persister.trained_into_published([])
    persist_seconds = trainer.persist() if trainer.persister.due() else 0.0
    one.engine.loaded = LoadedModel(model=one.model, version=version)  # the one model already holds the update
    return BenchStep(
        version=version,
        end_time=time.time(),
        rollouts=len(rollouts),
        response_tokens=sum(len(r) for r in batch.response_ids),
        rollout_versions=[batch.version],
        optimizer_steps=summary.optimizer_steps,
        publish_bytes=0,
        persisted_version=trainer.persister.persisted_version,
        persist_background_seconds=trainer.persister.last_write_seconds,
        seconds={
            "generation": batch.generate_seconds,
            "behaviour_logprobs": batch.logprob_seconds,
            "reference": scored["reference"],
            "reward": scored["reward"],
            "queue": 0.0,
            "update": update_seconds,
            "publish": 0.0,
            "persist": persist_seconds,
            "hot_swap": 0.0,
        },
    )


def raw_run(workload: Workload, one: OneProcess, records: list[BenchStep], start: float, waited_at_end: float) -> dict:
    """The run in the services mode's shape: its steps, the measured window's start, peak memory,
    bytes persisted, and the settings."""
    committed = committed_versions(one.config.run.checkpoint_dir)
    persist_bytes = checkpoint_bytes(committed[-1][1]) if committed else 0
    every, rows = workload.checkpoint_every_steps, workload.batch_size
    model = one.model
    return {
        "steps": [record.to_dict() for record in records],
        "measured_from": start,
        "warmup": workload.warmup,
        "peak_memory_bytes": {"in_process": peak_rss_bytes()},
        "bytes": {
            "publish_bytes_per_update": 0,
            "publish_bytes_per_rollout": 0.0,
            "checkpoint_bytes_per_persist": persist_bytes,
            "persist_bytes_per_update": persist_bytes / every,
            "persist_bytes_per_rollout": persist_bytes / every / rows,
        },
        "persist_writes_seconds": {str(v): sec for v, sec in sorted(one.writes.items())},
        "persist_wait_at_end_seconds": waited_at_end,
        "checkpoint_every_steps": every,
        "weight_transport": "none (one model: no hand-off)",
        "model_parameters": sum(p.numel() for p in model.parameters()),  # tied weights counted once
        # what a broadcast would send per replica (and cuda_ipc share) per update: the serving tensors
        "serving_tensor_bytes": sum(t.numel() * t.element_size() for t in serving_tensors(model, False).values()),
        "hot_swap_per_step": False,
        "settings": {
            "processes": "1 (policy = trainer model, reference, reward backend)",
            "torch_threads": workload.torch_threads,
            "reference_and_reward": "sequential",
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.bench.in_process", description=__doc__.split("\n")[0])
    parser.add_argument("--workload", required=True, help="JSON file of the Workload's fields")
    parser.add_argument("--run-dir", required=True, help="where its checkpoints go (emptied first)")
    parser.add_argument("--json", required=True, help="where the raw run is written")
    args = parser.parse_args(argv)
    workload = Workload(**json.loads(pathlib.Path(args.workload).read_text()))
    run = run_in_process(workload, pathlib.Path(args.run_dir))
    run["workload"] = dataclasses.asdict(workload)
    pathlib.Path(args.json).write_text(strict_json(run, indent=1))


if __name__ == "__main__":
    main()
