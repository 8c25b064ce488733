"""The one fixed workload every bench mode runs (issue #7): SmolLM2-135M-Instruct, 8 prompts per
batch (one sample each), 48 new tokens, one PPO epoch, seeded; the reward is a sequence classifier
of the policy's size (reward_model.py), the same for Belay and TRL."""

from __future__ import annotations

import dataclasses
import pathlib

from ..common.config import BelayConfig
from ..common.ports import free_ports
from ..common.prompts import read_prompts

REPO = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path("~/.cache/belay").expanduser()


@dataclasses.dataclass(frozen=True)
class Workload:
    model_dir: str = str(CACHE / "SmolLM2-135M-Instruct")
    reward_dir: str = str(CACHE / "SmolLM2-135M-reward")
    prompts_file: str = str(REPO / "prompts/default.txt")
    prompts_per_batch: int = 8
    max_new_tokens: int = 48
    ppo_epochs: int = 1
    minibatch_size: int = 4
    lr: float = 2e-5
    kl_coef: float = 0.2
    temperature: float = 1.0
    seed: int = 0
    iterations: int = 3  # measured PPO steps per mode
    warmup: int = 1  # steps run first and not measured (start-up, first allocation)
    torch_threads: int = 2
    checkpoint_every_steps: int = 10  # the trainer's default persist cadence (trainer.checkpoint_every_steps)

    @property
    def batch_size(self) -> int:
        return self.prompts_per_batch

    def prompts(self) -> list[str]:
        return read_prompts(self.prompts_file, "the bench's prompts file")


def service_threads(cores: int, max_staleness: int) -> dict[str, int]:
    """Torch threads per service so that services running at the same time never ask for more
    than `cores` between them (oversubscribed OpenMP threads spin against each other and slow
    every service several times over). Overlap off: the policy and the trainer take turns (all
    cores each); the reference and the reward run together (half each). Overlap on: the policy's
    generation runs beside the trainer's update (half each), the reference and reward beside the
    update too (half each, one after the other with generation)."""
    half = max(1, cores // 2)
    if max_staleness == 0:
        return {"policy": cores, "trainer": cores, "reference": half, "reward": half}
    return {"policy": half, "trainer": half, "reference": half, "reward": half}


def belay_config(
    workload: Workload, run_dir: pathlib.Path, max_staleness: int = 0, advantage: str = "batch_mean"
) -> BelayConfig:
    """The Belay config that runs `workload`: one actor batch is one trainer batch, the seed's recipe
    otherwise. max_staleness 0 is overlap off, 1 overlap on. No canaries and no review page: the
    bench measures the PPO loop alone. The actor polls for versions every 50 ms, so overlap off
    does not wait out the default half second after each update."""
    ports = free_ports(8)  # each bench stack its own
    threads = service_threads(workload.torch_threads, max_staleness)
    return BelayConfig.model_validate(
        {
            "run": {"name": "bench", "checkpoint_dir": str(run_dir / "checkpoints"), "log_level": "INFO"},
            "redis": {
                "url": f"redis://127.0.0.1:{ports[0]}/0",
                "max_queue_lag": 8 * workload.batch_size,
                "block_ms": 100,
            },
            # nothing in flight is worth waiting for once the bench has its steps
            "grpc": {"shutdown_grace_seconds": 0.5},
            "policy": policy_section(workload, ports[1], ports[2], threads["policy"]),
            "reference": {
                "model_dir": workload.model_dir,
                "address": f"127.0.0.1:{ports[3]}",
                "metrics_port": ports[4],
                "torch_threads": threads["reference"],
            },
            "reward": {
                "backend": "hf_classifier",
                "model_dir": workload.reward_dir,
                "address": f"127.0.0.1:{ports[5]}",
                "metrics_port": ports[6],
                "batch_size": workload.batch_size,
                "torch_threads": threads["reward"],
            },
            "trainer": trainer_section(workload, ports[7], ports[1], threads["trainer"], max_staleness, advantage),
        }
    )


def policy_section(workload: Workload, port: int, metrics_port: int, threads: int) -> dict:
    """The policy's config section: one batch of prompts_per_batch prompts, one sample each."""
    return {
        "model_dir": workload.model_dir,
        "prompts_file": workload.prompts_file,
        "address": f"127.0.0.1:{port}",
        "metrics_port": metrics_port,
        "prompts_per_batch": workload.prompts_per_batch,
        "samples_per_prompt": 1,
        "max_new_tokens": workload.max_new_tokens,
        "temperature": workload.temperature,
        "seed": workload.seed,
        "torch_threads": threads,
        "canary_prompts_file": "",
        "version_poll_seconds": 0.05,
    }


def trainer_section(
    workload: Workload, metrics_port: int, policy_port: int, threads: int, max_staleness: int, advantage: str
) -> dict:
    """The trainer's config section: the workload's PPO settings, the seed's recipe otherwise."""
    return {
        "model_dir": workload.model_dir,
        "metrics_port": metrics_port,
        "policy_address": f"127.0.0.1:{policy_port}",
        "batch_size": workload.batch_size,
        "minibatch_size": workload.minibatch_size,
        "ppo_epochs": workload.ppo_epochs,
        "lr": workload.lr,
        "kl_coef": workload.kl_coef,
        "temperature": workload.temperature,
        "max_staleness": max_staleness,
        "advantage": advantage,
        "keep_checkpoints": 2,
        "checkpoint_every_steps": workload.checkpoint_every_steps,
        "seed": workload.seed,
        "torch_threads": threads,
        "review_port": 0,
    }
