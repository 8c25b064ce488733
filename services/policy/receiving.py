"""The policy's side of the in-memory weight transports: an UpdateWeights request for `broadcast`
or `cuda_ipc` becomes staged tensors (name -> tensor) for SwapRequests.offer.

Staging costs one extra copy of the served weights (adapter tensors only under LoRA) in the
policy's memory (on its device), held until the actor swaps it in (PolicyEngine.swap_to copies it
in place) and the next version replaces it; while a new version is received the previous staged
one may still be held, so the peak is two copies. The manifest is checked against the model
before anyone joins a group or opens a handle: a misfit is refused at once and the old weights
keep serving. Only tensors move (broadcast into preallocated buffers, or CUDA IPC handles rebuilt
from plain fields): nothing is ever unpickled.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Mapping

import grpc
import torch
import torch.distributed as dist

from belay.v1 import belay_pb2

from ..common.checkpoints import check_fits
from ..common.cuda_ipc import local_device_index, open_buffer
from ..common.rpc import RequestError, invalid
from ..common.weight_buckets import bucket_layout, dtype_named, specs_from_messages, unflatten_bucket
from ..common.weight_groups import broadcast_bucket, make_group, ready_key

log = logging.getLogger(__name__)


def checked_layout(request: belay_pb2.UpdateWeightsRequest, own: Mapping[str, torch.Tensor]):
    """The request's manifest and bucket layout, refused unless they fit the served model exactly
    (INVALID_ARGUMENT for a malformed manifest, FAILED_PRECONDITION for one that misfits)."""
    try:
        specs = specs_from_messages(request.manifest)
    except ValueError as error:
        raise invalid(f"version {request.version}: manifest refused: {error}") from None
    if request.bucket_bytes <= 0:
        raise invalid(f"version {request.version}: bucket_bytes must be positive, got {request.bucket_bytes}")
    try:
        check_fits(dict(own), {spec.name: spec.shape for spec in specs}, f"version {request.version}'s manifest")
    except ValueError as error:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"{error}; the old weights keep serving") from None
    return specs, bucket_layout(specs, request.bucket_bytes)


def split_rendezvous(rendezvous: str) -> tuple[str, int]:
    host, _, port = rendezvous.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise invalid(f"rendezvous {rendezvous[:100]!r} is not host:port")
    return host.strip("[]"), int(port)


class BroadcastReceiver:
    """Holds this replica's group with the trainer (rank 1 of 2) between versions; one receive at a time."""

    def __init__(self, device: torch.device, timeout_seconds: float):
        self.device, self.timeout_seconds = device, timeout_seconds
        self.lock = threading.Lock()
        self.key: str | None = None
        self.store = self.group = None

    def receive(
        self, request: belay_pb2.UpdateWeightsRequest, own: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Join (or reuse) the group the request names and receive every bucket into fresh staging
        buffers; returns name -> view into them, shaped as the manifest says."""
        specs, layout = checked_layout(request, own)
        if request.rank != 1 or request.world_size != 2:
            raise invalid(
                f"a broadcast group holds the trainer (rank 0) and this replica (rank 1): got rank "
                f"{request.rank} of {request.world_size}"
            )
        if not request.group_key:
            raise invalid("a broadcast request needs its group_key")
        backend = request.backend or "gloo"
        if backend not in ("gloo", "nccl"):
            raise invalid(f"backend {backend!r} is neither gloo nor nccl")
        if backend == "nccl" and self.device.type != "cuda":
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the trainer sends over NCCL (CUDA tensors) but this policy runs on the CPU: use "
                "trainer.weight_transport 'file', or run the trainer on the CPU (gloo)",
            )
        host, port = split_rendezvous(request.rendezvous)
        with self.lock:
            try:
                if request.new_group or request.group_key != self.key:
                    if not request.new_group:  # e.g. this replica restarted: the trainer rebuilds on failure
                        raise RequestError(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            "this replica holds no broadcast group under that key; the trainer "
                            "builds a new one on its next try",
                        )
                    self.key, self.store, self.group = None, None, None  # the old group (if any) is let go
                    timeout = datetime.timedelta(seconds=self.timeout_seconds)
                    self.store = dist.PrefixStore(
                        request.group_key, dist.TCPStore(host, port, is_master=False, timeout=timeout)
                    )
                    self.store.set(ready_key(request.version), b"1")
                    self.group = make_group(self.store, 1, 2, backend, self.timeout_seconds)
                    self.key = request.group_key
                else:
                    self.store.set(ready_key(request.version), b"1")
                staged = {}
                for bucket in layout:
                    buffer = torch.empty(bucket.numel, dtype=dtype_named(bucket.dtype), device=self.device)
                    broadcast_bucket(self.group, buffer)
                    staged.update(unflatten_bucket(bucket, buffer))
            except RequestError:
                raise
            except Exception as error:  # a timeout, or the trainer gone mid-send: the group is broken
                self.key, self.store, self.group = None, None, None
                raise RequestError(
                    grpc.StatusCode.ABORTED,
                    f"version {request.version}: the broadcast broke off "
                    f"({str(error)[:300]}); the old weights keep serving",
                ) from None
        return {spec.name: staged[spec.name] for spec in specs}


def receive_ipc(
    request: belay_pb2.UpdateWeightsRequest, own: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Open each exported bucket buffer of the trainer's (same GPU) and copy it into a staging
    buffer on `device`; once this returns the trainer may free or reuse its buffers."""
    if not request.ipc_buffers:
        raise invalid("a cuda_ipc request needs its ipc_buffers")
    try:
        index = local_device_index(request.ipc_buffers[0].device_uuid)
    except ValueError as error:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"version {request.version} refused: {error}") from None
    if device.type != "cuda" or (device.index if device.index is not None else torch.cuda.current_device()) != index:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"version {request.version} refused: the policy serves on {device}, the trainer's buffers "
            f"are on cuda:{index}: cuda_ipc is for a trainer and a policy on the same GPU",
        )
    specs, layout = checked_layout(request, own)
    if len(request.ipc_buffers) != len(layout):
        raise invalid(f"{len(request.ipc_buffers)} ipc_buffers for a layout of {len(layout)} buckets")
    staged = {}
    for bucket, message in zip(layout, request.ipc_buffers):
        if (
            message.numel != bucket.numel
            or message.dtype != bucket.dtype
            or message.device_uuid != request.ipc_buffers[0].device_uuid
        ):
            raise invalid(
                f"an ipc buffer of {message.numel} {message.dtype} on {message.device_uuid[:64]} does not "
                f"match its bucket of {bucket.numel} {bucket.dtype}"
            )
        shared = open_buffer(message, index)
        staged.update(unflatten_bucket(bucket, shared.clone()))
        del shared
    torch.cuda.synchronize(index)  # every copy done before the trainer is told it may reuse its buffers
    return {spec.name: staged[spec.name] for spec in specs}
