"""Publish: after every update, the weights the policy serves reach it through a weight transport.

Publishing is on the trainer's critical path, so it moves only what the policy needs: the model's
tensors in their serving dtype (adapter tensors only under LoRA), never optimizer state. Which
transport carries them is `trainer.weight_transport`:

- `file`: a vNNNNNN directory of safetensors in run.publish_dir (memory-backed by default), which
  the policy memory-maps; versions no replica serves any more are removed;
- `broadcast`: a torch.distributed group per policy replica (services/trainer/broadcast.py);
- `cuda_ipc`: CUDA IPC handles for a policy on the trainer's GPU (services/trainer/cuda_ipc.py).

Every publication is announced in Redis (the truth: version, location, transport, and how many
trained rollouts still await their persist) and pushed to the policy with UpdateWeights.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from belay.v1 import belay_pb2, belay_pb2_grpc

from ..common.checkpoints import committed_versions, prune_below, remove_unfinished, write_checkpoint, write_weights
from ..common.config import BelayConfig
from ..common.lora import adapter_config, adapter_tensors, write_adapter_files
from ..common.models import resolve_device, resolve_dtype
from ..common.published import published_dir
from ..common.rollout_queue import RolloutQueue
from ..common.safetensors_file import preallocate

log = logging.getLogger(__name__)
REPLICA_REPORT_MAX_AGE = 120.0  # seconds: a replica silent for longer no longer holds back pruning


def serving_tensors(model: torch.nn.Module, lora: bool, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors the policy serves: under LoRA the adapter's; otherwise the state dict with tied
    duplicates dropped (the first name of each storage kept, as save_pretrained does for an lm_head
    tied to the embeddings). The live tensors (no copies) where dtype is None or theirs; else
    floating tensors cast to `dtype`, the policy's serving dtype (bfloat16 serving from float32
    master weights moves half the bytes)."""
    if lora:
        tensors = adapter_tensors(model)
    else:
        seen, tensors = set(), {}
        for name, tensor in model.state_dict().items():
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key not in seen:
                seen.add(key)
                tensors[name] = tensor.detach()
    if dtype is None:
        return tensors
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}


@dataclass
class Publication:
    version: int
    location: str  # the directory (file), or "" where the weights travel by a group
    transport: str
    bytes: int  # moved per receiving replica
    seconds: float  # on the trainer's critical path, the announcement included


class Transport(Protocol):
    name: str
    drops: int  # sends to a replica that failed since start (that replica was dropped from that version)

    def send(self, version: int, tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
        """Deliver one version's tensors; returns (location to announce, bytes moved per replica)."""

    def prepare(self) -> None:
        """As an update begins: get ready for the next send off the critical path (or nothing)."""

    def catch_up(self, version: int, tensors: Callable[[], dict[str, torch.Tensor]]) -> list[str]:
        """Between updates, hand the current version to replicas that joined late or restarted;
        cheap when none did. Returns the replicas sent it."""

    def forget_below(self, version: int) -> None:
        """Release what is kept of versions older than `version` (no replica serves them)."""

    def close(self, remove: bool) -> None:
        """Stop; with remove, delete what was published (the final version is persisted)."""


class FileTransport:
    """Weights-only safetensors in the publish directory, committed by rename, no fsync: published
    weights are a hand-off, not a record (the persisted checkpoint is the record).

    While each update runs a background thread allocates the next version's file (PREALLOCATED, of the
    size last written; `prepare`), so the next publish writes into existing pages: on /dev/shm that takes the
    538 MB SmolLM2 write from 0.36-0.41 s to 0.13-0.15 s. Never a file a replica may read: only a
    fresh one, renamed into the new version's directory."""

    name = "file"
    drops = 0  # nothing is sent to a replica: each reads the announced directory
    PREALLOCATED = ".preallocated.safetensors"

    def __init__(self, root: pathlib.Path, lora_config: Callable[[], dict] | None):
        self.root, self.lora_config = root, lora_config
        self.root.mkdir(parents=True, exist_ok=True)
        # The one publisher: what an earlier trainer left (half-written, or whole under numbers that a
        # run started afresh would reuse) goes; the current version is published again at start.
        for path in remove_unfinished(self.root):
            log.warning("removed %s, a publish a killed trainer never finished", path)
        for _, path in committed_versions(self.root):
            shutil.rmtree(path, ignore_errors=True)
        (self.root / self.PREALLOCATED).unlink(missing_ok=True)
        self.preallocating: threading.Thread | None = None
        self.next_size: int | None = None  # the size of the file `prepare` allocates (the last one written)

    def send(self, version: int, tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
        written = []
        spare = self.root / self.PREALLOCATED
        if self.preallocating is not None:
            self.preallocating.join()  # done long since, unless updates are faster than a page allocation

        def write_files(directory: pathlib.Path) -> None:
            if self.lora_config is not None:
                written.append(write_adapter_files(directory, tensors, self.lora_config()))
            else:
                written.append(write_weights(directory, tensors, into=spare))

        shutil.rmtree(self.root / f"v{version:06d}", ignore_errors=True)  # never another run's weights
        location = str(write_checkpoint(self.root, version, write_files, durable=False))
        self.preallocating = None
        self.next_size = written[0] if self.lora_config is None else None
        return location, written[0]

    def prepare(self) -> None:
        """Allocate the next publish's file in the background. The trainer calls this as its next
        update begins, not right after a publish: then the policies are swapping to the version just
        published, and zeroing pages beside that copy slowed each swap from 0.18 to 0.33 s."""
        if self.next_size is None or self.preallocating is not None:
            return
        self.preallocating = threading.Thread(
            target=self.preallocate,
            args=(self.root / self.PREALLOCATED, self.next_size),
            name="preallocate-publish",
            daemon=True,
        )
        self.preallocating.start()

    @staticmethod
    def preallocate(path: pathlib.Path, size: int) -> None:
        try:
            preallocate(path, size)
        except OSError as error:  # a full or unusual filesystem: the next publish writes a fresh file
            log.warning("could not preallocate %s (%s); publishing writes a fresh file", path, error)
            path.unlink(missing_ok=True)

    def catch_up(self, version: int, tensors: Callable[[], dict[str, torch.Tensor]]) -> list[str]:
        """Nothing to do: a late replica reads the announced directory from Redis."""
        return []

    def forget_below(self, version: int) -> None:
        for path in prune_below(self.root, version):
            log.debug("removed published %s: no replica serves it", path)

    def close(self, remove: bool) -> None:
        if self.preallocating is not None:
            self.preallocating.join()
        (self.root / self.PREALLOCATED).unlink(missing_ok=True)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def make_transport(config: BelayConfig, model: torch.nn.Module) -> Transport:
    lora = (lambda: adapter_config(model)) if config.lora.enabled else None
    kind = config.trainer.weight_transport
    if kind == "file":
        return FileTransport(published_dir(config.run), lora)
    # The in-memory transports send to the replicas the registry lists (each actor reports its address).
    registry = RolloutQueue.from_url(config.redis.url, config.run.name)
    replicas = lambda: registry.replicas(REPLICA_REPORT_MAX_AGE)  # noqa: E731
    if kind == "broadcast":
        from .broadcast import BroadcastTransport

        return BroadcastTransport(config, replicas)
    from .cuda_ipc import CudaIpcTransport

    return CudaIpcTransport(config, replicas)


class Publisher:
    """Sends each version through the transport, announces it, and prunes what no replica serves."""

    def __init__(
        self, config: BelayConfig, queue: RolloutQueue, policy: belay_pb2_grpc.PolicyStub | None, transport: Transport
    ):
        self.config, self.queue, self.policy, self.transport = config, queue, policy, transport
        self.serving_dtype = resolve_dtype(config.policy.dtype, resolve_device(config.policy.device))

    def publish(
        self, version: int, model: torch.nn.Module, awaiting: int, until_redis_answers: Callable
    ) -> Publication:
        started = time.perf_counter()
        location, moved = self.transport.send(
            version, serving_tensors(model, self.config.lora.enabled, self.serving_dtype)
        )
        until_redis_answers(
            lambda: self.queue.publish_version(version, location, self.transport.name, awaiting),
            f"announcing version {version}",
        )
        self.push(version, location)
        seconds = time.perf_counter() - started
        self.prune(version, until_redis_answers)
        return Publication(version, location, self.transport.name, moved, seconds)

    def catch_up(self, version: int, model: torch.nn.Module) -> list[str]:
        """Call between updates, when `model` holds the latest published `version`: a replica that
        registered late or restarted gets it now, not at the next update (which, with
        max_staleness, could wait forever on rollouts only that replica would make)."""
        return self.transport.catch_up(
            version, lambda: serving_tensors(model, self.config.lora.enabled, self.serving_dtype)
        )

    def push(self, version: int, location: str) -> None:
        """Tell the policy at once (file transport); the Redis key stays the truth if this fails."""
        if self.policy is None or self.transport.name != "file":
            return
        try:
            self.policy.UpdateWeights(
                belay_pb2.UpdateWeightsRequest(version=version, checkpoint_path=location), timeout=10
            )
        except grpc.RpcError as error:
            log.warning("policy not told of version %d (%s); it will find it in Redis", version, error.code().name)

    def prune(self, newest: int, until_redis_answers: Callable) -> None:
        """Forget versions older than the oldest one a live replica serves (and than `newest`)."""
        replicas = until_redis_answers(lambda: self.queue.replicas(REPLICA_REPORT_MAX_AGE), "reading replicas")
        oldest_served = min([record["version"] for record in replicas.values()], default=newest)
        self.transport.forget_below(min(oldest_served, newest))

    def close(self, remove: bool, newest: int | None = None, wait_seconds: float = 30.0) -> None:
        """Stop publishing. With remove (the newest version is persisted), first give the live
        replicas up to wait_seconds to take `newest`, then delete what was published."""
        deadline = time.monotonic() + wait_seconds
        while remove and newest is not None and time.monotonic() < deadline:
            try:
                replicas = self.queue.replicas(REPLICA_REPORT_MAX_AGE)
            except Exception:  # noqa: BLE001 - Redis gone at shutdown: nobody to wait for
                break
            if all(record["version"] >= newest for record in replicas.values()):
                break
            time.sleep(0.2)
        self.transport.close(remove)
