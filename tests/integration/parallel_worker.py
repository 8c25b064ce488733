"""One rank of a data-parallel update, for test_parallel_update.py: spawned by torch.multiprocessing
(gloo on CPU), it builds a real Trainer on the tiny model, runs one update on a fixed batch and
writes its full weights (the critic's too) as safetensors, for the test to compare with one rank.
options 'task': 'persist' (persist version 1 after the update through the trainer's own persist path,
then one more update as if nothing had happened) or 'resume' (resume version 1 before the update,
refusing any unpickling, and counting the bytes it reads from the weights' files through
gathering.safe_open: rank{r}-weight-reads.json); both write the whole AdamW state too
(rank{r}-optimizer*.safetensors).
`mutation`: 'no_reduction' turns the gradient reduction off (DDP: a comm hook that returns this
rank's own gradients; FSDP2: a reduce-scatter that keeps this rank's rows of its own gradients),
'nan_on_rank_1' makes rank 1's loss NaN, 'oom_on_rank_1' makes rank 1's forward raise an out-of-memory
error, 'loss_scale_2^40' starts a float16 trainer's loss scale at 2^40 on every rank. options
'reward_factor' scales the rewards. The summary also records the dtype the first block's weights had
in each forward."""

from __future__ import annotations

import datetime
import json
import os
import pathlib

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from services.common.models import load_tokenizer
from services.common.rollout_queue import Rollout
from services.trainer import gathering, sharded_persist, update
from services.trainer.distributed import Distributed
from services.trainer.meta_start import start_policy
from services.trainer.trainer import Trainer
from services.trainer.trainer_metrics import TrainerMetrics
from tests.conftest import free_port
from tests.pickle_trap import refusing_unpickling

from .conftest import make_config
from .read_counting import counting_reads

# What the update reports, compared across rank counts (services/trainer/rank_share.py).
REPORTED = (
    "loss",
    "approx_kl",
    "clip_fraction",
    "entropy",
    "value_loss",
    "first_minibatch_max_log_ratio",
    "kl_coef_next",
    "early_stopped",
)


def fixed_rollouts(vocab_size: int, rows: int = 8, prompt: int = 5, reward_factor: float = 1.0) -> list[Rollout]:
    """`rows` rollouts with fixed ids and responses of 2 to 9 tokens: the ranks' shares hold unequal
    token counts, which a per-token mean must weigh (services/trainer/rank_share.py); rewards times
    reward_factor (tiny: gradients that underflow in a float16 backward)."""
    generator = np.random.default_rng(0)
    lengths = [2 + (row * 5) % 8 for row in range(rows)]
    return [
        Rollout(
            prompt_text="p",
            response_text="r",
            prompt_ids=generator.integers(3, vocab_size, prompt),
            response_ids=generator.integers(3, vocab_size, lengths[row]),
            logprobs=generator.uniform(-6, -3, lengths[row]).astype(np.float32),
            ref_logprobs=generator.uniform(-6, -3, lengths[row]).astype(np.float32),
            reward=(float(row % 3) - 1.0 + 0.1 * row) * reward_factor,
            policy_version=0,
            finish_reason="length",
            group_id=f"g{row // 2}",
            group_size=2,
        )
        for row in range(rows)
    ]


def build_trainer(model_dir: str, checkpoint_dir: str, options: dict, distributed: Distributed | None) -> Trainer:
    lora = options.pop("lora", None)
    settings = {"model_dir": model_dir, "batch_size": 8, "minibatch_size": 4, "lr": 1e-3, **options}
    config = make_config(run={"checkpoint_dir": checkpoint_dir}, trainer=settings, lora=lora or {})
    model = start_policy(config, torch.device("cpu"), distributed)  # as services/trainer/__main__.py starts it
    tokenizer = load_tokenizer(model_dir)
    return Trainer(config, model, tokenizer, None, TrainerMetrics(CollectorRegistry()), None, distributed)


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every weight of the policy and critic, whole, on this rank (FSDP2 shards gathered)."""
    if trainer.distributed is None:
        state = trainer.learner.state_dict()
    else:
        state = get_model_state_dict(trainer.learner, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def mutate(trainer: Trainer, mutation: str | None, rank: int) -> None:
    if mutation == "no_reduction":
        if trainer.section.parallelism == "ddp":
            trainer.learner.register_comm_hook(None, lambda _, bucket: own_gradients(bucket))
        else:  # (set_requires_gradient_sync(False) would leave the shards without gradients: no step at all)
            for module in trainer.learner.modules():
                if isinstance(module, FSDPModule):
                    module.set_custom_reduce_scatter(OwnRowsOnly())
    elif mutation == "oom_on_rank_1" and rank == 1:  # as a CUDA allocator would in this rank's first forward

        def out_of_memory(*args):
            raise torch.OutOfMemoryError("CUDA out of memory (provoked on rank 1)")

        update.minibatch_loss = out_of_memory
    elif mutation == "nan_on_rank_1" and rank == 1:
        original = update.minibatch_loss

        def nan_loss(*args):
            loss, info, entropy = original(*args)
            return loss * float("nan"), info, entropy

        update.minibatch_loss = nan_loss
    elif mutation == "loss_scale_2^40":  # float16: scaled gradients overflow on every rank
        trainer.loss_scale.scale = 2.0**40


def training_bytes(trainer: Trainer) -> int:
    """The bytes of this rank's trainable parameters, their gradients and AdamW state (tensor bytes,
    a shard's own under FSDP2; not process memory)."""

    def size(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.numel() * local.element_size()

    total = sum(size(p) + (size(p.grad) if p.grad is not None else 0) for p in trainer.parameters)
    return total + sum(size(v) for state in trainer.optimizer.state.values() for v in state.values() if v.dim())


def persist_version_1(trainer: Trainer) -> float:
    """As Trainer.step and following.follow do under fsdp: every rank joins the gather of the weights and
    writes its shards, rank 0 persists the rest. Returns this rank's seconds writing its shard file."""
    trainer.version = 1
    if trainer.sharded:
        gathering.gather_weights(trainer)
        sharded_persist.persist_together(trainer, True if trainer.main_rank else None, wait=True)
    elif trainer.main_rank:
        trainer.persist(wait=True)
    if trainer.distributed is not None:
        trainer.distributed.barrier()
    return trainer.shard_write_seconds


def full_optimizer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """AdamW's state, whole on this rank ('<parameter name>/<exp_avg|exp_avg_sq|step>'; full_tensor is
    collective: every rank walks the parameters in the same order)."""
    names = sharded_persist.parameter_names(trainer)
    found = {}
    for name, parameter in zip(names, trainer.parameters):
        for key, value in sorted(trainer.optimizer.state.get(parameter, {}).items()):
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            found[f"{name}/{key}"] = whole.detach().clone().contiguous()
    return found


def record_compute_dtypes(trainer: Trainer) -> dict[str, set[str]]:
    """The dtypes the weights have as the layers compute, at each forward: 'block', the first block's first
    linear (under fsdp as FSDP2 gathered it: its MixedPrecisionPolicy's param_dtype); 'critic', the value head."""
    names = trainer.model.named_modules()  # the tiny Llama's (a PEFT wrapper's too): *.layers.0.self_attn.*
    block = next(module for name, module in names if ".layers.0." in name and isinstance(module, torch.nn.Linear))
    modules = {"block": (block, block)}
    if trainer.value_head is not None:  # ValueHead.forward reads linear.weight without calling linear
        modules["critic"] = (trainer.value_head, trainer.value_head.linear)
    seen: dict[str, set[str]] = {part: set() for part in modules}
    for part, (module, linear) in modules.items():
        module.register_forward_pre_hook(
            lambda _, args, part=part, linear=linear: seen[part].add(str(linear.weight.dtype))
        )
    return seen


class OwnRowsOnly:
    """FSDP2's reduce-scatter without the reduction: each rank keeps its own rows of its own gradients."""

    def allocate(self, size, *, dtype, device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False) -> None:
        output_tensor.copy_(input_tensor.chunk(group.size())[group.rank()])


def own_gradients(bucket) -> torch.futures.Future:
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def run(rank: int, world: int, port: int, model_dir: str, out: str, options: dict, mutation: str | None) -> None:
    """One rank (world 1: no process group at all); writes out/rank{rank}.safetensors and .json."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    distributed = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # A collective one rank never joins fails after 2 minutes instead of hanging the test.
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        distributed = Distributed(rank=rank, world_size=world)
    options = dict(options)
    reward_factor = options.pop("reward_factor", 1.0)
    task = options.pop("task", "update")  # 'persist': then persist as version 1; 'resume': resume it first
    checkpoints = options.pop("checkpoint_dir", str(pathlib.Path(out) / f"checkpoints{rank}"))
    trainer = build_trainer(model_dir, checkpoints, options, distributed)
    out = pathlib.Path(out)
    if task == "resume":
        with refusing_unpickling(), counting_reads(gathering) as read:  # what resume takes of the weights' files
            assert trainer.resume() == 1
        (out / f"rank{rank}-weight-reads.json").write_text(json.dumps(read))
        save_file(full_weights(trainer), str(out / f"rank{rank}-resumed.safetensors"))
        save_file(full_optimizer_state(trainer), str(out / f"rank{rank}-optimizer-resumed.safetensors"))
    before = full_weights(trainer)
    mutate(trainer, mutation, rank)
    compute_dtypes = record_compute_dtypes(trainer)
    stats = trainer.update(fixed_rollouts(trainer.model.config.vocab_size, reward_factor=reward_factor))
    after = full_weights(trainer)
    summary = {"persist_seconds": persist_version_1(trainer)} if task == "persist" else {}
    if task == "persist":  # then the update a resumed trainer makes, without the interruption
        save_file(full_optimizer_state(trainer), str(out / f"rank{rank}-optimizer.safetensors"))
        trainer.update(fixed_rollouts(trainer.model.config.vocab_size))
        save_file(full_weights(trainer), str(out / f"rank{rank}-next.safetensors"))
    save_file(after, str(out / f"rank{rank}.safetensors"))
    moved = max(float((after[k] - before[k]).abs().max()) for k in after)
    moved_norm = float(torch.cat([(after[k] - before[k]).flatten() for k in after]).norm())
    summary |= {
        "optimizer_steps": stats.optimizer_steps,
        "skipped": stats.skipped_minibatches,
        "out_of_memory": stats.out_of_memory,
        **{name: getattr(stats, name) for name in REPORTED},
        "moved": moved,
        "moved_norm": moved_norm,  # the update's L2 norm over every weight
        "bytes": training_bytes(trainer),
        "loss_scale": trainer.loss_scale.scale,
        "nonfinite_skips": trainer.metrics.nonfinite_skips._value.get(),
        "compute_dtypes": {part: sorted(dtypes) for part, dtypes in compute_dtypes.items()},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    if distributed is not None:
        distributed.close()


def run_ranks(world: int, model_dir, out, options: dict, mutation: str | None = None) -> list[dict]:
    """run() at `world` ranks (1: in this process, no process group); each rank's weights and summary."""
    out.mkdir(parents=True, exist_ok=True)
    if world == 1:  # run() sets one torch thread: give the pytest process its own count back after
        threads = torch.get_num_threads()
        try:
            run(0, 1, 0, str(model_dir), str(out), options, mutation)
        finally:
            torch.set_num_threads(threads)
    else:
        mp.spawn(run, args=(world, free_port(), str(model_dir), str(out), options, mutation), nprocs=world, join=True)
    return [
        {"weights": load_file(str(out / f"rank{r}.safetensors")), **json.loads((out / f"rank{r}.json").read_text())}
        for r in range(world)
    ]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k] - b[k]).abs().max()) for k in a), default=0.0)


def l2_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The L2 norm of a - b over every weight."""
    assert a.keys() == b.keys()
    return float(torch.cat([(a[k] - b[k]).flatten() for k in a]).norm())
