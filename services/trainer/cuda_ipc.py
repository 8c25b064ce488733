"""The `cuda_ipc` weight transport: for a policy on the trainer's own GPU, where NCCL refuses two
ranks on one device. The trainer flattens the serving tensors into bucket buffers (the layout of
services/common/weight_buckets.py), exports their CUDA IPC handles as plain fields
(services/common/cuda_ipc.py, no pickle) in UpdateWeights, and keeps the buffers until every
replica has answered: a replica copies each buffer into its own staging memory before it answers,
so the answer is the acknowledgement that lets the trainer free them. Memory: one extra copy of the
served weights on the GPU on each side for the duration (the policy's staged copy lives until the
actor swaps it in). Replicas come from the registry like the broadcast transport's; a failing one
is dropped from this publish and caught up later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
import torch

from belay.v1 import belay_pb2, belay_pb2_grpc

from ..common.config import BelayConfig
from ..common.cuda_ipc import export_buffer
from ..common.rpc import channel
from ..common.weight_buckets import bucket_layout, flatten_bucket, manifest_of, specs_to_messages
from .broadcast import CATCH_UP_EVERY_SECONDS, RETRY_AFTER_FAILURE_SECONDS, readable_receivers

log = logging.getLogger(__name__)


class CudaIpcTransport:
    name = "cuda_ipc"

    def __init__(self, config: BelayConfig, replicas: Callable[[], dict[str, dict]]):
        if not torch.cuda.is_available():
            raise ValueError(
                "trainer.weight_transport 'cuda_ipc' needs the trainer on a CUDA device, and this "
                "machine has none: use 'broadcast' (gloo on CPU) or 'file'"
            )
        self.config, self.replicas = config, replicas
        self.timeout = config.trainer.broadcast_timeout_seconds
        self.bucket_bytes = max(1, int(config.trainer.broadcast_bucket_mb * 2**20))
        self.sent: dict[str, int] = {}
        self.drops = 0  # sends to a replica that failed (it was dropped from that version), since start
        self.failed_at: dict[str, float] = {}
        self.channels: dict[str, tuple[grpc.Channel, belay_pb2_grpc.PolicyStub]] = {}
        self.last_catch_up = 0.0
        self.lock = threading.Lock()

    def send(self, version: int, tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
        with self.lock:
            self.send_to(self.live_replicas(), version, tensors)
        return "", sum(t.numel() * t.element_size() for t in tensors.values())

    def catch_up(self, version: int, tensors: Callable[[], dict[str, torch.Tensor]]) -> list[str]:
        now = time.monotonic()
        if now - self.last_catch_up < CATCH_UP_EVERY_SECONDS or version <= 0:
            return []
        self.last_catch_up = now
        with self.lock:
            lagging = {
                name: record
                for name, record in self.live_replicas().items()
                if record["version"] < version
                and self.sent.get(name, -1) < version
                and now - self.failed_at.get(name, -RETRY_AFTER_FAILURE_SECONDS) >= RETRY_AFTER_FAILURE_SECONDS
            }
            return self.send_to(lagging, version, tensors()) if lagging else []

    def prepare(self) -> None:
        """Nothing to get ready: each send goes straight from the trainer's tensors."""

    def forget_below(self, version: int) -> None:
        """Nothing is kept between versions."""

    def close(self, remove: bool) -> None:
        for policy_channel, _ in self.channels.values():
            policy_channel.close()
        self.channels.clear()

    def live_replicas(self) -> dict[str, dict]:
        return readable_receivers(self.replicas, self.name)

    def send_to(self, targets: dict[str, dict], version: int, tensors: dict[str, torch.Tensor]) -> list[str]:
        if not targets:
            return []
        if not all(t.is_cuda for t in tensors.values()):
            raise ValueError("cuda_ipc sends CUDA tensors only; the trainer's model is not on a GPU")
        manifest = manifest_of(tensors)
        layout = bucket_layout(manifest, self.bucket_bytes)
        buffers = [flatten_bucket(bucket, tensors) for bucket in layout]  # kept until every replica answers
        torch.cuda.synchronize()
        request = belay_pb2.UpdateWeightsRequest(
            version=version,
            transport=self.name,
            manifest=specs_to_messages(manifest, belay_pb2.TensorSpec),
            bucket_bytes=self.bucket_bytes,
            ipc_buffers=[export_buffer(b, belay_pb2.CudaIpcBuffer) for b in buffers],
        )
        calls = {
            name: self._stub(record["address"]).UpdateWeights.future(request, timeout=self.timeout)
            for name, record in targets.items()
        }
        delivered = []
        for name, call in calls.items():
            try:
                call.result()
                self.sent[name] = version
                delivered.append(name)
            except grpc.RpcError as error:
                self.failed_at[name] = time.monotonic()
                self.drops += 1
                log.warning(
                    "replica %s dropped from version %d (it catches up later): %s: %s",
                    name,
                    version,
                    error.code().name,
                    error.details(),
                )
        del buffers  # every replica has copied out (or given up): the handles may go
        return delivered

    def _stub(self, address: str) -> belay_pb2_grpc.PolicyStub:
        if address not in self.channels:
            policy_channel = channel(address, self.config.grpc)
            self.channels[address] = (policy_channel, belay_pb2_grpc.PolicyStub(policy_channel))
        return self.channels[address][1]
