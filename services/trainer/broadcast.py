"""The `broadcast` weight transport: each update's tensors go from the trainer straight into every
policy replica's memory over torch.distributed (gloo for CPU tensors, NCCL for CUDA ones), in
buckets of about trainer.broadcast_bucket_mb (services/common/weight_buckets.py).

Groups. The trainer hosts a TCPStore on the port of trainer.broadcast_address; every group lives
under its own PrefixStore, a fresh random key. Groups are built directly (ProcessGroupGloo /
ProcessGroupNCCL over that store), never with init_process_group, so they are apart from the group
a torchrun trainer trains in, and the default group is never touched.

One group per replica (world size 2: the trainer rank 0, the replica rank 1), not one group of
N+1 ranks. A torch.distributed group cannot drop or add a member: in a shared group one replica
that dies mid-receive stalls every collective until the timeout, and one that joins or restarts
forces every member to rebuild. With a group each, a failure costs only that replica's group,
rebuilt under a fresh key when it joins, restarts (a new replica name in the registry) or after a
failed send; the sends run in parallel threads, each op bounded by broadcast_timeout_seconds, and a
failing replica is dropped from this publish (catch_up hands it the current weights later). The
price: the trainer's link carries the bytes once per replica, where one group's tree or ring
broadcast would carry them about once. With a handful of replicas that is the better trade; many
replicas would want a relay (a replica forwarding to others) rather than one big group.

Rendezvous. For each send the trainer calls the replica's UpdateWeights (a future) with the
store's address, the group key (a secret: it travels only in this RPC, which beyond loopback needs
the token), the manifest and the bucket size; the replica checks the manifest against its model
(a misfit is refused at once, before anyone joins), sets a ready key under the group's prefix,
joins, receives every bucket into staging buffers and offers them to the actor. The trainer waits
for the ready key or the RPC's failure, whichever comes first, so a refused, dead or unreachable
replica costs a round trip, not the timeout. The store and gloo's connections are not
authenticated: the store's port must be reachable only from the policy replicas (docs/weight-transports.md).

Multi-rank trainers. Only rank 0 sends (the Publisher exists on rank 0 only). Under FSDP2 the
same layout serves two ways: rank 0 gathers each bucket's full tensors (DTensor.full_tensor,
bucket by bucket, so it holds one bucket extra) and sends as here; or every rank joins each
replica's group (world size ranks + 1) and broadcasts its shards, the manifest carrying each
shard's offsets so the replica assembles them. The first is what this module would do next.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
import torch.distributed as dist

from belay.v1 import belay_pb2, belay_pb2_grpc

from ..common.config import BelayConfig
from ..common.rpc import channel
from ..common.weight_buckets import Bucket, bucket_layout, flatten_bucket, manifest_of, specs_to_messages
from ..common.weight_groups import broadcast_bucket, make_group, ready_key

log = logging.getLogger(__name__)
CATCH_UP_EVERY_SECONDS = 1.0  # at most this often catch_up reads the replica registry
# catch_up waits this long after a failed send before trying that replica again, doubling with each
# failure in a row up to MAX_RETRY_SECONDS: a stuck replica must not cost collect a timeout every pass
RETRY_AFTER_FAILURE_SECONDS = 30.0
MAX_RETRY_SECONDS = 600.0


def receivers(records: dict[str, dict], transport: str) -> dict[str, dict]:
    """The registry's replicas that take `transport`, one per address: a replica restarted within
    the registry's max age is listed under its old name too, and only the newest report is alive."""
    newest: dict[str, tuple[str, dict]] = {}
    for name, record in records.items():
        address = record.get("address")
        if record.get("transport") != transport or not address:
            continue
        if address not in newest or record.get("time", 0) > newest[address][1].get("time", 0):
            newest[address] = (name, record)
    return dict(newest.values())


def readable_receivers(read_replicas, transport: str) -> dict[str, dict]:
    """receivers() of the registry as read now; none (with a warning) while Redis cannot answer:
    the Redis key is the truth, and the replicas catch up once it answers."""
    try:
        found = read_replicas()
    except Exception as error:  # noqa: BLE001 - any registry failure means: nobody to send to this time
        log.warning("replica registry unreadable (%s): no replica receives this version", error)
        return {}
    return receivers(found, transport)


@dataclass
class ReplicaGroup:
    """The trainer's side of one replica's group."""

    address: str
    key: str = field(default_factory=lambda: secrets.token_hex(16))
    group: object | None = None  # built on the first send
    sent_version: int = -1  # the newest version this replica received from us
    failed_at: float | None = None  # time.monotonic() of the last failed send
    failures: int = 0  # failed sends in a row

    def may_catch_up(self, version: int, now: float) -> bool:
        """Not sent `version` yet, and past the back-off of its last failed send."""
        if self.sent_version >= version:
            return False
        if self.failed_at is None or self.failures == 0:
            return True
        return now - self.failed_at >= min(RETRY_AFTER_FAILURE_SECONDS * 2 ** (self.failures - 1), MAX_RETRY_SECONDS)


class BroadcastTransport:
    name = "broadcast"

    def __init__(self, config: BelayConfig, replicas: Callable[[], dict[str, dict]]):
        """`replicas` reads the registry (replica -> {"version", "address", "transport", ...})."""
        section = config.trainer
        self.config, self.replicas = config, replicas
        self.timeout = section.broadcast_timeout_seconds
        self.bucket_bytes = max(1, int(section.broadcast_bucket_mb * 2**20))
        host, _, port = section.broadcast_address.rpartition(":")
        # The trainer listens on every interface at the configured port (0: any free one, for tests);
        # replicas reach the store at the configured host.
        try:
            self.store = dist.TCPStore(
                host,
                int(port),
                is_master=True,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=self.timeout),
            )
        except (RuntimeError, ValueError) as error:  # e.g. the port is taken (another trainer?)
            raise RuntimeError(
                f"cannot host the broadcast store on port {port} of trainer.broadcast_address "
                f"{section.broadcast_address}: {error}; free the port or choose another"
            ) from None
        self.rendezvous = f"{host}:{self.store.port}"
        self.groups: dict[str, ReplicaGroup] = {}
        self.channels: dict[str, tuple[grpc.Channel, belay_pb2_grpc.PolicyStub]] = {}
        self.last_catch_up = 0.0
        self.drops = 0  # sends to a replica that failed (it was dropped from that version), since start
        self.lock = threading.Lock()  # a send and a catch-up never overlap

    # --- the Transport protocol -----------------------------------------------------------
    def send(self, version: int, tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
        """Every live replica that takes broadcasts receives `tensors`; one that fails is dropped
        from this publish (logged) and caught up later. Returns ("", bytes per replica)."""
        with self.lock:
            targets = self.live_replicas()
            self.send_to(targets, version, tensors)
        return "", sum(t.numel() * t.element_size() for t in tensors.values())

    def catch_up(self, version: int, tensors: Callable[[], dict[str, torch.Tensor]]) -> list[str]:
        """Between updates: send `version` (the current weights, made on demand by `tensors`) to
        each replica that reports an older one and was not sent it yet: one that registered late
        or restarted. Cheap when nobody lags: one registry read a second. Returns who was sent it."""
        now = time.monotonic()
        if now - self.last_catch_up < CATCH_UP_EVERY_SECONDS or version <= 0:
            return []
        self.last_catch_up = now
        with self.lock:
            lagging = {
                name: record
                for name, record in self.live_replicas().items()
                if record["version"] < version
                and (name not in self.groups or self.groups[name].may_catch_up(version, now))
            }
            if not lagging:
                return []
            log.info("catching up replicas %s to version %d", sorted(lagging), version)
            return self.send_to(lagging, version, tensors())

    def prepare(self) -> None:
        """Nothing to get ready: each send goes straight from the trainer's tensors."""

    def forget_below(self, version: int) -> None:
        """Nothing is kept between versions: the weights live in the replicas' memory."""

    def close(self, remove: bool) -> None:
        for group in self.groups.values():
            self._shutdown(group)
        self.groups.clear()
        for policy_channel, _ in self.channels.values():
            policy_channel.close()
        self.channels.clear()

    # --- sending --------------------------------------------------------------------------
    def live_replicas(self) -> dict[str, dict]:
        """Registered replicas that take broadcasts (a registry Redis cannot answer: none this time)."""
        live = readable_receivers(self.replicas, self.name)
        for name in set(self.groups) - set(live):  # gone (or restarted under a new name): its group goes
            self._shutdown(self.groups.pop(name))
        return live

    def send_to(self, targets: dict[str, dict], version: int, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Send to each target in its own thread; returns the replicas that took it. A thread still
        busy past its whole budget is abandoned (daemon) and its replica counted as failed."""
        if not targets:
            return []
        manifest = manifest_of(tensors)
        layout = bucket_layout(manifest, self.bucket_bytes)
        backend = "nccl" if next(iter(tensors.values())).is_cuda else "gloo"
        outcomes: dict[str, BaseException | None] = {}
        threads = []
        for name, record in targets.items():
            group = self.groups.get(name)
            if group is None or group.address != record["address"]:
                if group is not None:
                    self._shutdown(group)
                group = self.groups[name] = ReplicaGroup(record["address"])
            request = belay_pb2.UpdateWeightsRequest(
                version=version,
                transport=self.name,
                rendezvous=self.rendezvous,
                group_key=group.key,
                new_group=group.group is None,
                rank=1,
                world_size=2,
                manifest=specs_to_messages(manifest, belay_pb2.TensorSpec),
                bucket_bytes=self.bucket_bytes,
                backend=backend,
            )
            thread = threading.Thread(
                target=self._send_one,
                args=(name, group, request, layout, tensors, outcomes),
                name=f"broadcast-{name}",
                daemon=True,
            )
            thread.start()
            threads.append((name, thread))
        deadline = time.monotonic() + self.timeout * (2 + len(layout)) + 5.0
        delivered = []
        for name, thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            error = outcomes.get(name, TimeoutError("the send thread did not finish in time"))
            group = self.groups.get(name)
            if error is None and group is not None:
                group.sent_version, group.failures = version, 0
                delivered.append(name)
                continue
            log.warning("replica %s dropped from version %d (it catches up later): %s", name, version, error)
            self.drops += 1
            if group is not None:
                group.failed_at = time.monotonic()
                self._shutdown(group)
                # the next try builds a new group under a fresh key, remembering when this one failed
                self.groups[name] = ReplicaGroup(
                    group.address,
                    failed_at=group.failed_at,
                    failures=group.failures + 1,
                    sent_version=group.sent_version,
                )
        return delivered

    def _send_one(
        self,
        name: str,
        group: ReplicaGroup,
        request: belay_pb2.UpdateWeightsRequest,
        layout: list[Bucket],
        tensors: dict[str, torch.Tensor],
        outcomes: dict,
    ) -> None:
        call = None
        try:
            prefix = dist.PrefixStore(group.key, self.store)
            budget = self.timeout * (2 + len(layout))
            call = self._stub(group.address).UpdateWeights.future(request, timeout=budget)
            self._wait_until_ready(prefix, request.version, call)
            if group.group is None:
                group.group = make_group(prefix, 0, 2, request.backend, self.timeout)
            for bucket in layout:
                broadcast_bucket(group.group, flatten_bucket(bucket, tensors))
            reply = call.result()
            log.debug(
                "replica %s received version %d (serving %d, pending %d)",
                name,
                request.version,
                reply.current_version,
                reply.pending_version,
            )
            outcomes[name] = None
        except grpc.RpcError as error:
            outcomes[name] = RuntimeError(f"UpdateWeights failed: {error.code().name}: {error.details()}")
        except Exception as error:  # a timeout or a broken connection in the group
            if call is not None:
                call.cancel()
            outcomes[name] = error

    def _wait_until_ready(self, prefix, version: int, call: grpc.Future) -> None:
        """Until the replica has accepted and is joining; its refusal or death ends the wait at once."""
        deadline = time.monotonic() + self.timeout
        key = ready_key(version)
        delay = 0.001
        while not prefix.check([key]):
            if call.done():
                call.result()  # raises the replica's refusal; an answer before joining is one too
                raise RuntimeError("the replica answered without joining the group")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica did not join within {self.timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        prefix.delete_key(key)

    def _stub(self, address: str) -> belay_pb2_grpc.PolicyStub:
        if address not in self.channels:
            policy_channel = channel(address, self.config.grpc)
            self.channels[address] = (policy_channel, belay_pb2_grpc.PolicyStub(policy_channel))
        return self.channels[address][1]

    @staticmethod
    def _shutdown(group: ReplicaGroup) -> None:
        """Let go of a group (a failed one cannot be reused: its peer may be gone)."""
        pg, group.group = group.group, None
        if pg is not None:
            try:
                pg.abort() if hasattr(pg, "abort") else None
            except Exception as error:  # already broken: nothing more to release
                log.debug("aborting a broadcast group: %s", error)
