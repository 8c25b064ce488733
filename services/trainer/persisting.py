"""Persist: the full resumable checkpoint, every trainer.checkpoint_every_steps updates or
checkpoint_every_seconds (whichever comes first), at max_steps and on SIGTERM, written in the
background so the next update does not wait for it.

The trainer's thread takes a snapshot (copies of the weights, the optimizer state, the value
head and the RNG into CPU buffers kept from one persist to the next: about 12 bytes per trained
parameter with AdamW in float32, the memory this costs), and a writer thread commits it
atomically with checkpoints.write_checkpoint (temp dir, fsync, rename). Only once it is committed
are the rollouts it includes acknowledged (XACK): a crash before that redelivers them, and the
resumed trainer trains them once into its lineage. One persist is in flight at a time.

Under trainer.parallelism fsdp the AdamW state and the critic are not in the snapshot: every rank has
already written its shard of them into the version's temp directory (sharded_persist.py), and the
writer adds the gathered weights and the rest before committing it (Snapshot.shards_written).
"""

from __future__ import annotations

import logging
import pathlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..common.checkpoints import prune_checkpoints, save_trainer_state, write_checkpoint, write_weights
from ..common.lora import write_adapter_files
from ..common.rollout_queue import RolloutQueue
from .best_version import marked_versions

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """Everything a checkpoint holds, copied off the live training state at one version."""

    version: int
    weights: dict[str, torch.Tensor]  # CPU copies: the model (or the adapters under LoRA)
    state: dict[str, torch.Tensor]  # optimizer/..., value_head/..., rng/...
    meta: dict  # the JSON half of the resume state
    adapter_config: dict | None = None
    shards_written: bool = False  # under fsdp: every rank's shard file is already in the temp directory
    entry_ids: list[str] = field(default_factory=list)  # stream entries trained into versions <= this one


class SnapshotBuffers:
    """CPU tensors reused across persists, so a snapshot is a copy, not an allocation (and no page
    faults after the first). On CPU, a copy of the live tensors; on GPU, the device-to-host copy."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        copied = {}
        for name, tensor in tensors.items():
            tensor = tensor.detach()
            buffer = self.buffers.get(name)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = self.buffers[name] = torch.empty(
                    tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda
                )
            buffer.copy_(tensor, non_blocking=tensor.is_cuda)
            copied[name] = buffer
        if any(t.is_cuda for t in tensors.values()):
            torch.cuda.synchronize()
        return copied


class Persister:
    def __init__(
        self,
        root: str,
        keep: int,
        every_steps: int,
        every_seconds: float,
        queue: RolloutQueue | None,
        until_redis_answers: Callable,
        write_extra: Callable[[pathlib.Path], None],
        version: int = 0,
    ):
        self.root, self.keep = root, keep
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.queue, self.until_redis_answers, self.write_extra = queue, until_redis_answers, write_extra
        self.buffers = SnapshotBuffers()
        self.lock = threading.Lock()
        self.trained: list[str] = []  # entries trained since the last snapshot (pending in Redis)
        self.in_flight: list[str] = []  # entries of the snapshot being written
        self.thread: threading.Thread | None = None
        self.persisted_version = version
        self.updates_since = 0
        self.last_persist = time.monotonic()
        self.last_write_seconds = 0.0
        self.failures = 0
        self.on_persisted: Callable[[float], None] = lambda seconds: None
        self.on_failure: Callable[[], None] = lambda: None

    # --- accounting ------------------------------------------------------------------------------
    def trained_into_published(self, entry_ids: list[str]) -> None:
        with self.lock:
            self.trained.extend(entry_ids)
            self.updates_since += 1

    def awaiting(self) -> int:
        """Rollouts trained into published versions, not yet in a committed checkpoint."""
        with self.lock:
            return len(self.trained) + len(self.in_flight)

    def holds(self, entry_id: str) -> bool:
        with self.lock:
            return entry_id in self.trained or entry_id in self.in_flight

    def seconds_since(self) -> float:
        return time.monotonic() - self.last_persist

    def due(self) -> bool:
        return self.updates_since > 0 and (
            self.updates_since >= self.every_steps or self.seconds_since() >= self.every_seconds
        )

    # --- writing ---------------------------------------------------------------------------------
    def start(self, snapshot: Snapshot) -> float:
        """Hand a snapshot to the writer thread (after the one in flight, if any, has finished).
        Returns the seconds this call waited for the previous persist."""
        waited = self.wait()
        with self.lock:
            snapshot.entry_ids, self.in_flight, self.trained = list(self.trained), list(self.trained), []
            self.updates_since = 0
        self.last_persist = time.monotonic()
        # A daemon: finish() waits for it on every clean exit; nothing else may keep the process alive
        self.thread = threading.Thread(
            target=self._write, args=(snapshot,), name=f"persist-v{snapshot.version}", daemon=True
        )
        self.thread.start()
        return waited

    def wait(self) -> float:
        started = time.perf_counter()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        return time.perf_counter() - started

    def _write(self, snapshot: Snapshot) -> None:
        started = time.perf_counter()
        try:
            path = write_checkpoint(
                self.root,
                snapshot.version,
                lambda directory: self._files(directory, snapshot),
                started=snapshot.shards_written,
            )
        except Exception:  # noqa: BLE001 - any failure keeps the rollouts pending for the next persist
            log.exception("persisting version %d failed; its rollouts stay unacknowledged", snapshot.version)
            with self.lock:
                self.trained[:0], self.in_flight = self.in_flight, []
                self.updates_since += 1
            self.failures += 1
            self.on_failure()
            return
        with self.lock:
            self.in_flight = []
        if self.queue is not None:  # only now: the checkpoint holds them
            self.until_redis_answers(
                lambda: self.queue.ack_persisted(snapshot.entry_ids, self.awaiting()),
                f"acknowledging the rollouts of version {snapshot.version}",
            )
        prune_checkpoints(self.root, self.keep, protect=marked_versions(self.root))  # the best stays
        self.persisted_version = snapshot.version
        self.last_write_seconds = time.perf_counter() - started
        self.on_persisted(self.last_write_seconds)
        log.info(
            "persisted version %d in the background in %.2f s (%s, %d rollouts acknowledged)",
            snapshot.version,
            self.last_write_seconds,
            path,
            len(snapshot.entry_ids),
        )

    def _files(self, directory: pathlib.Path, snapshot: Snapshot) -> None:
        if snapshot.adapter_config is not None:
            write_adapter_files(directory, snapshot.weights, snapshot.adapter_config)
        else:
            write_weights(directory, snapshot.weights)
        self.write_extra(directory)  # config.json, generation config, tokenizer: a Hugging Face directory
        save_trainer_state(directory, snapshot.state, snapshot.meta)
