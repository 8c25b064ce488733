"""The memory plan of a Belay config: each model's config.json and the run's settings into a plan
per service (services/common/memory_plan.py does the arithmetic), the services that share a device
summed against its memory, the plan logged by each service at start and each process capped.

The settings it reads: `<section>.dtype` ('auto': bfloat16 on CUDA, float32 on CPU),
`trainer.gradient_checkpointing`, `policy.max_prompt_tokens` (the KV cache's prompt length),
`policy.kv_cache` (paged: its own plan, paged_plan.py, with `policy.max_tokens_per_forward` and the
policy's attention), and the log-prob chunks: `trainer.logprob_chunk_positions` in the trainer,
LOGPROB_CHUNK_POSITIONS in the reference and the paged policy.

CPU devices are not checked: the plan is logged for them, but RAM is shared with everything else on
the machine and the kernel's overcommit makes a sum against it say little.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

from .config_section import resolve_attention
from .memory_plan import (
    DTYPE_BYTES,
    ServicePlan,
    device_verdicts,
    memory_fraction,
    model_shape,
    policy_plan,
    reference_plan,
    refusal,
    render_plan,
    reward_items,
    service_plan,
    trainer_plan,
)
from .paged_plan import paged_policy_plan
from .token_logprobs import LOGPROB_CHUNK_POSITIONS

log = logging.getLogger(__name__)
CUDA_PROBE = (
    "import json, torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
    "print(json.dumps([torch.cuda.get_device_properties(i).total_memory for i in range(n)]))"
)


class Lengths(NamedTuple):
    rows: int  # sequences in flight: prompts_per_batch * samples_per_prompt
    prompt_tokens: int
    new_tokens: int

    @property
    def width(self) -> int:
        return self.prompt_tokens + self.new_tokens


class DeviceShare(NamedTuple):
    device: str
    fraction: float | None  # None: no cap (a CPU device, or no plan)


def plan_device(name: str, cuda_available: bool) -> str:
    """'auto' is cuda:0 when CUDA is present, else cpu; 'cuda' is cuda:0."""
    if name == "auto":
        return "cuda:0" if cuda_available else "cpu"
    return "cuda:0" if name == "cuda" else name


def dtype_bytes(section, device: str) -> int:
    dtype = section.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return DTYPE_BYTES[dtype]


def read_shape(model_dir: str, classifier: bool = False):
    path = pathlib.Path(model_dir).expanduser() / "config.json"
    if not model_dir or not path.is_file():
        raise FileNotFoundError(f"{model_dir!r} holds no config.json")
    return model_shape(json.loads(path.read_text()), classifier)


def _policy(config, lengths: Lengths, cuda: bool) -> list[ServicePlan]:
    section = config.policy
    device = plan_device(section.device, cuda)
    shape, size = read_shape(section.model_dir), dtype_bytes(section, device)
    batch = (shape, size, lengths.rows, lengths.prompt_tokens, lengths.new_tokens, device)
    if section.kv_cache != "paged":
        return [policy_plan(*batch)]
    masked = resolve_attention(section.attn_implementation, device) != "flash_attention_2"
    return [paged_policy_plan(*batch, section.max_tokens_per_forward, masked, LOGPROB_CHUNK_POSITIONS)]


def _reference(config, lengths: Lengths, cuda: bool) -> list[ServicePlan]:
    section = config.reference
    device = plan_device(section.device, cuda)
    tokens = min(section.max_tokens_per_forward, lengths.rows * lengths.width)
    shape = read_shape(section.model_dir)
    return [reference_plan(shape, dtype_bytes(section, device), tokens, device, min(LOGPROB_CHUNK_POSITIONS, tokens))]


def _reward(config, lengths: Lengths, cuda: bool) -> list[ServicePlan]:
    """The hf_classifier model, or each hf_classifier component of a combined reward (on its device)."""
    section = config.reward
    scorers = [("reward", section)] if section.backend == "hf_classifier" else []
    if section.backend == "combined":
        scorers = [(f"reward {c.name}", c) for c in section.components if c.backend == "hf_classifier"]
    by_device: dict[str, list] = {}
    for label, scorer in scorers:
        device = plan_device(section.device if scorer.device == "auto" else scorer.device, cuda)
        tokens = min(scorer.batch_size, lengths.rows) * scorer.max_length
        shape = read_shape(scorer.model_dir, classifier=True)
        by_device.setdefault(device, []).extend(reward_items(shape, dtype_bytes(scorer, device), tokens, label))
    return [service_plan("reward", device, items) for device, items in by_device.items()]


def _trainer(config, lengths: Lengths, cuda: bool) -> list[ServicePlan]:
    section = config.trainer
    device = plan_device(section.device, cuda)
    minibatch_tokens = section.minibatch_size * lengths.width
    return [
        trainer_plan(
            read_shape(section.model_dir),
            dtype_bytes(section, device),
            minibatch_tokens,
            section.gradient_checkpointing,
            min(section.logprob_chunk_positions, minibatch_tokens),
            0,  # the full-batch pass (GAE, full KL) is chunked too: one chunk at a time
            device,
            fsdp_ranks(section),
        )
    ]


def fsdp_ranks(section) -> int:
    """How many ranks share the trainer's model: WORLD_SIZE under torchrun with trainer.parallelism
    fsdp; 1 otherwise (one process, or ddp, where every rank holds a whole copy)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world if world > 1 and section.parallelism == "fsdp" else 1


PLANNERS = {"policy": _policy, "reference": _reference, "reward": _reward, "trainer": _trainer}


def config_plans(config, cuda_available: bool) -> tuple[list[ServicePlan], list[str]]:
    """Every service's plan, and a note for each service that has none (no model, or no config.json)."""
    policy = config.policy
    lengths = Lengths(
        policy.prompts_per_batch * policy.samples_per_prompt, policy.max_prompt_tokens, policy.max_new_tokens
    )
    plans, notes = [], []
    for service, planner in PLANNERS.items():
        try:
            service_plans = planner(config, lengths, cuda_available)
        except (OSError, KeyError, ValueError) as error:
            notes.append(f"{service}: no memory plan ({type(error).__name__}: {error})")
            continue
        if not service_plans:
            notes.append(f"{service}: no model on a device to plan (backend {config.reward.backend})")
        plans += service_plans
    return plans, notes


def cuda_capacities() -> dict[str, int]:
    """Total memory of each CUDA device this process sees (torch.cuda.get_device_properties)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())}


def probe_cuda_capacities(timeout_seconds: float = 120) -> dict[str, int]:
    """cuda_capacities() from a child process, so that the launcher holds no CUDA context of its own;
    {} at once on a machine with no NVIDIA device files."""
    if not glob.glob("/dev/nvidia[0-9]*") and not pathlib.Path("/dev/dxg").exists():
        return {}
    result = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True, timeout=timeout_seconds)
    if result.returncode != 0:
        log.warning("could not read the CUDA devices' memory: %s", result.stderr.strip()[-500:])
        return {}
    return {f"cuda:{i}": size for i, size in enumerate(json.loads(result.stdout.splitlines()[-1]))}


def memory_check(config) -> tuple[str, str | None]:
    """For `belay up`, before anything starts: (a report, one line per device and per note; the
    refusal message when a device's plan does not fit, else None)."""
    capacities = probe_cuda_capacities()
    plans, notes = config_plans(config, bool(capacities))
    verdicts = device_verdicts(plans, capacities)
    report = "\n".join(["memory plan:", *(f"  {v.summary()}" for v in verdicts), *(f"  {n}" for n in notes)])
    return report, refusal(verdicts)


def log_memory_plan(config, service_name: str) -> DeviceShare:
    """Log this service's plan and its device's verdict; return the share of the device it may use
    (for cap_process_memory). A plan that does not fit is a warning here: `belay up` refuses it."""
    import torch

    cuda = torch.cuda.is_available()
    plans, notes = config_plans(config, cuda)
    own = [plan for plan in plans if plan.service == service_name]
    if not own:
        log.info("; ".join(note for note in notes if note.startswith(service_name)) or "no memory plan")
        return DeviceShare(plan_device(getattr(config, service_name).device, cuda), None)
    verdicts = {verdict.device: verdict for verdict in device_verdicts(plans, cuda_capacities())}
    for plan in own:
        log.info("%s", render_plan(plan))
        verdict = verdicts[plan.device]
        (log.info if verdict.fits else log.warning)("%s", verdict.message())
    device = own[0].device
    return DeviceShare(device, memory_fraction(verdicts[device], service_name) if device.startswith("cuda") else None)


def cap_process_memory(device: str, fraction: float | None) -> None:
    """torch.cuda.set_per_process_memory_fraction(fraction, device) on a CUDA device; nothing on a
    CPU, or without a fraction. Allocations past the cap raise CUDA out-of-memory in this process
    instead of starving the other services on the device."""
    if fraction is None or not device.startswith("cuda"):
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device))
        log.info("this process may allocate %.0f %% of %s (its share of the memory plan)", 100 * fraction, device)
