"""What a checkpoint holds of the trainer and how a trainer comes back from one: the snapshot a
persist writes (weights, optimizer, critic, RNG, β, reward moments, float16 loss scale, lineage,
the rollout ids trained on), restoring it on start, and publishing at once after a restart."""

from __future__ import annotations

import logging
import pathlib
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..common.checkpoints import (
    latest_valid_checkpoint,
    load_trainer_state,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    remove_unfinished,
)
from ..common.lora import adapter_config, load_weights_or_adapter
from . import gathering, sharded_persist
from .lineage import Lineage
from .persisting import Snapshot
from .publishing import serving_tensors
from .retry import until_redis_answers

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)
REMEMBERED_ROLLOUT_IDS = 50_000  # for de-duplication across at-least-once redelivery
CHECKPOINT_FORMAT = 2  # 1: a checkpoint per version; 2: lineage, persist cadence


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`/, the prefix taken off their names."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def restore(trainer: Trainer) -> int:
    """Load the newest committed checkpoint, if any: weights, optimizer, RNG, version, seen ids.
    Returns the version resumed (0: none, a fresh start)."""
    if trainer.main_rank:  # the one writer cleans up after itself
        for path in remove_unfinished(trainer.config.run.checkpoint_dir):
            log.warning("removed %s, a checkpoint a killed trainer never finished", path)
    latest = latest_valid_checkpoint(trainer.config.run.checkpoint_dir, log)
    if latest is None:
        return 0
    version, path = latest
    tensors, meta = load_trainer_state(path)
    if meta.get("format", 1) > CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} was written in checkpoint format {meta['format']} by a newer Belay; this "
            f"trainer reads formats 1 to {CHECKPOINT_FORMAT}: resume it with that version or newer"
        )
    optimizer_state = optimizer_state_from_flat(prefixed(tensors, "optimizer/"), meta["optimizer"])
    if sharded_persist.is_sharded_checkpoint(path):  # persisted under fsdp: each rank reads its rows
        sharded_persist.restore_sharded(trainer, path, meta)
    elif trainer.sharded:  # persisted whole (one rank, ddp): each rank keeps its rows
        gathering.load_whole(trainer, path, prefixed(tensors, "value_head/"), optimizer_state)
    else:
        load_weights_or_adapter(trainer.model, path)
        if trainer.value_head is not None:
            trainer.value_head.load_state_dict(prefixed(tensors, "value_head/"))
        trainer.optimizer.load_state_dict(optimizer_state)
    trainer.scheduler.load_state_dict(meta["scheduler"])
    trainer.kl_controller.load_state_dict(meta["kl_controller"])
    trainer.reward_moments.load_state_dict(meta["reward_moments"])
    trainer.loss_scale.load_state_dict(meta.get("loss_scale"))  # absent before loss scaling: the initial S
    trainer.good_versions = set(meta.get("good_versions", [0]))
    trainer.rolled_back_at = meta.get("rolled_back_at", 0)
    torch.set_rng_state(tensors["rng/torch"])
    trainer.shuffle.set_state(tensors["rng/shuffle"])
    trainer.version = version
    trainer.lineage = Lineage.from_state(meta.get("lineage"), version)  # absent before format 2: numbers
    trainer.persister.persisted_version = version
    trainer.consumed_ids.extend(meta["consumed_rollout_ids"])
    log.info("resumed from %s (version %d)", path, version)
    return version


def publish_at_start(trainer: Trainer) -> None:
    """A resumed (or restarted) trainer publishes at once, so no replica keeps sampling from
    weights that were never persisted. Versions only grow: when an earlier trainer published
    past the persisted version P, the weights of P go out as a new version above all of them,
    and the versions in between become orphans of this lineage (see Lineage.staleness)."""
    published = until_redis_answers(trainer.queue.latest_version, "reading the published version")[0]
    if published > trainer.version:
        log.warning(
            "versions %d..%d were published but never persisted; version %d (persisted) is published "
            "again as version %d",
            trainer.version + 1,
            published,
            trainer.version,
            published + 1,
        )
        trainer.lineage.orphans_after(trainer.version, published)
        trainer.lineage.republish(trainer.version, published + 1)
        trainer.version = published + 1
    if trainer.version > 0 or published > 0:
        trainer.publish(trainer.version)


def snapshot(trainer: Trainer, version: int) -> Snapshot:
    """Copies of everything the checkpoint holds, taken between updates (the persist writes them later)."""
    if trainer.sharded:  # AdamW and the critic: already in every rank's shard file (sharded_persist.py)
        if trainer.sharded_optimizer_rest is None:
            raise RuntimeError("under fsdp a persist goes through sharded_persist.persist_together (all ranks)")
        optimizer_rest, trainer.sharded_optimizer_rest, state = trainer.sharded_optimizer_rest, None, {}
    else:
        optimizer_tensors, optimizer_rest = optimizer_state_to_flat(trainer.optimizer.state_dict())
        state = {f"optimizer/{k}": v for k, v in optimizer_tensors.items()}
        if trainer.value_head is not None:
            state.update({f"value_head/{k}": v for k, v in trainer.value_head.state_dict().items()})
    lora = trainer.config.lora.enabled
    weights = serving_tensors(trainer.full_model, lora)
    copied = trainer.persister.buffers.copy({**{f"weights/{k}": v for k, v in weights.items()}, **state})
    state = {k: copied[k] for k in state}
    state["rng/torch"] = torch.get_rng_state()
    state["rng/shuffle"] = trainer.shuffle.get_state()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": version,
        "optimizer": optimizer_rest,
        "scheduler": trainer.scheduler.state_dict(),
        "kl_controller": trainer.kl_controller.state_dict(),
        "reward_moments": trainer.reward_moments.state_dict(),
        "loss_scale": trainer.loss_scale.state_dict(),  # the same on every rank: rank 0's JSON is enough
        "good_versions": sorted(trainer.good_versions),
        "rolled_back_at": trainer.rolled_back_at,
        "lineage": trainer.lineage.state(),
        "consumed_rollout_ids": list(trainer.consumed_ids)[-REMEMBERED_ROLLOUT_IDS:],
        "config": trainer.config.model_dump(mode="json"),
    }
    return Snapshot(
        version=version,
        shards_written=trainer.sharded,
        weights={k: copied[f"weights/{k}"] for k in weights},
        state=state,
        meta=meta,
        adapter_config=adapter_config(trainer.model) if lora else None,
    )


def write_model_files(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lora: bool, directory: pathlib.Path
) -> None:
    """Beside the weights: what makes a checkpoint a Hugging Face model directory (belay eval loads it)."""
    if not lora:
        model.config.to_json_file(directory / "config.json")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.to_json_file(directory / "generation_config.json")
    tokenizer.save_pretrained(directory)
