"""The rails. The KL rail (trainer.kl_hard_limit): a batch whose KL per response passes the limit
says the version that sampled it went too far from the reference. The canary rail
(trainer.rollback_on_degenerate): the policy found a version's greedy canary answers degenerate.
Either way the trainer restores the newest good version that was persisted, publishes it as a new
version (the policy swaps back), raises β or lowers the learning rate, and drops the batch with its
reason."""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..common.checkpoints import committed_versions
from ..common.lora import load_weights_or_adapter
from ..common.rollout_queue import Rollout
from ..common.step_records import RollbackRecord
from . import gathering, sharded_persist
from .retry import until_redis_answers

if TYPE_CHECKING:
    from .intake import Entry
    from .trainer import Trainer

log = logging.getLogger(__name__)


def batch_kl(rollouts: list[Rollout]) -> float:
    """Mean k1 KL per response, Σ_t (logprob − ref_logprob), over the batch, in nats."""
    return float(np.mean([float(r.logprobs.sum() - r.ref_logprobs.sum()) for r in rollouts]))


def degenerate_version(trainer: Trainer) -> int | None:
    """The newest version, published since the last rollback, whose canary answers the policy found
    degenerate (its verdicts in the review store: services/policy/canaries.py); None when none is.
    The policy answers the canaries after it swaps, so the verdict on a version arrives a batch or
    two after the trainer published it."""
    verdicts = until_redis_answers(trainer.review.canary_verdicts, "reading the canary verdicts")
    flagged = [v for v, degenerate in verdicts.items() if degenerate and trainer.rolled_back_at < v <= trainer.version]
    return max(flagged, default=None)


def clean_versions(trainer: Trainer) -> set[int]:
    """Versions whose canary verdict is in and not degenerate, and 0 (the SFT model)."""
    verdicts = until_redis_answers(trainer.review.canary_verdicts, "reading the canary verdicts")
    return {0} | {v for v, degenerate in verdicts.items() if not degenerate}


def roll_back(trainer: Trainer, entries: list[Entry], kl: float, degenerate: int | None = None) -> RollbackRecord:
    """Restore the newest good version that was persisted (published weights are not kept),
    publish it as a new version, raise β or lower the learning rate, and drop the batch. The cause:
    the batch's KL past kl_hard_limit (degenerate None; good: every version whose samples stayed
    under it), or version `degenerate`'s canary answers (good: a version whose canaries were not).
    With no good version persisted yet, the target is the SFT model, and the log says so."""
    section = trainer.section
    trainer.persister.wait()  # a persist in flight may be the good version to return to
    checkpoints = dict(committed_versions(trainer.config.run.checkpoint_dir))
    if degenerate is None:
        worst, good, reason = min(r.policy_version for _, r in entries), trainer.good_versions, "kl_limit"
        detail = f"batch KL {kl:.2f} nats > kl_hard_limit {section.kl_hard_limit}"
    else:
        worst, good, reason = degenerate, clean_versions(trainer), "canary_degenerate"
        detail = f"version {degenerate}'s canary answers are degenerate (trainer.rollback_on_degenerate)"
    target = rollback_target(trainer, worst, checkpoints, good)
    if trainer.distributed is not None:  # the other ranks roll back with it (follow_roll_back)
        trainer.distributed.broadcast_bytes(json.dumps({"roll_back_to": target}).encode())
    restore_weights(trainer, target, checkpoints)
    trainer.optimizer.state.clear()  # the moments steered towards the bad version
    tighten(trainer)
    version = trainer.advance_version()
    trainer.good_versions.add(version)
    trainer.rolled_back_at = version  # verdicts on versions up to here are about weights left behind
    if trainer.sharded:
        gathering.gather_weights(trainer)
    trainer.publish(version)
    # At once: the restored weights and the raised β or lowered lr are the new base.
    if trainer.sharded:  # every rank writes its shards first (follow_roll_back joins)
        sharded_persist.persist_together(trainer, True)
    else:
        trainer.persist()
    for entry_id, _ in entries:
        trainer.intake.drop(entry_id, reason, detail)
    trainer.metrics.rollbacks.inc()
    record = RollbackRecord(
        version=version,
        rolled_back_to=target,
        batch_kl=kl,
        kl_coef=trainer.kl_controller.value,
        lr=trainer.optimizer.param_groups[0]["lr"],
        time=time.time(),
        cause="kl_hard_limit" if degenerate is None else "canary_degenerate",
        degenerate_version=degenerate,
    )
    until_redis_answers(lambda: trainer.queue.log_step(record), "logging the rollback")
    if trainer.tensorboard is not None:
        trainer.tensorboard.write_rollback(record)
    raise_beta = section.kl_limit_action == "raise_beta"
    log.warning(
        "%s: rolled back to version %d, published as version %d; %s now %s",
        detail,
        target,
        version,
        "β" if raise_beta else "lr",
        record.kl_coef if raise_beta else record.lr,
    )
    return record


def follow_roll_back(trainer: Trainer, target: int) -> None:
    """A rank other than 0, told by rank 0 to roll back to version `target`: the same weights from
    the same checkpoint (every rank reads the checkpoint directory, as on resume), moments cleared,
    β or lr tightened, and the gathers rank 0's publish and persist need under fsdp."""
    restore_weights(trainer, target, dict(committed_versions(trainer.config.run.checkpoint_dir)))
    trainer.optimizer.state.clear()
    tighten(trainer)
    trainer.version += 1
    if trainer.sharded:
        gathering.gather_weights(trainer)
        sharded_persist.persist_together(trainer, None)


def rollback_target(trainer: Trainer, worst: int, checkpoints: dict[int, pathlib.Path], good: set[int]) -> int:
    """The newest good version below `worst` (the oldest that sampled the batch, or the degenerate
    one) that a committed checkpoint holds; 0 (the SFT model) when there is none."""
    persisted_good = [v for v in good if v < worst and v in checkpoints]
    target = max(persisted_good, default=0)
    if target == 0:
        log.warning(
            "no good version below %d is persisted (checkpoint_every_steps=%d): rolling back to the SFT model",
            worst,
            trainer.section.checkpoint_every_steps,
        )
    return target


def restore_weights(trainer: Trainer, target: int, checkpoints: dict[int, pathlib.Path]) -> None:
    """The policy's weights (or adapters) of version `target`; of the SFT model for 0."""
    lora = trainer.config.lora.enabled
    if target == 0 and lora:
        with torch.no_grad():  # zero adapters: exactly the base model
            for name, parameter in trainer.model.named_parameters():
                if "lora_B" in name:
                    parameter.zero_()
    elif trainer.sharded:  # each rank reads only its rows of the weights
        source = pathlib.Path(trainer.section.model_dir if target == 0 else checkpoints[target])
        gathering.load_weight_rows(trainer, source)
    else:
        load_weights_or_adapter(trainer.model, trainer.section.model_dir if target == 0 else checkpoints[target])


def tighten(trainer: Trainer) -> None:
    """kl_limit_action: β × kl_limit_factor, or the learning rate (and its schedule's base) ÷ it."""
    section = trainer.section
    if section.kl_limit_action == "raise_beta":
        trainer.kl_controller.value *= section.kl_limit_factor
    else:
        trainer.scheduler.base_lrs = [lr / section.kl_limit_factor for lr in trainer.scheduler.base_lrs]
        for group, lr in zip(trainer.optimizer.param_groups, trainer.scheduler.get_last_lr()):
            group["lr"] = lr / section.kl_limit_factor
