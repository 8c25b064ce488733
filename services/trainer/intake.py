"""Reading rollouts from Redis into batches: our own pending entries first (left by a restart),
then entries a dead trainer left, then new ones; stale, orphaned, malformed and already-trained
rollouts dropped and counted; under group baselines (group, rloo) only whole groups taken."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

from ..common.config import BelayConfig
from ..common.rollout_queue import MalformedRollout, Rollout, RolloutQueue, consumer_name
from .lineage import Lineage
from .persisting import Persister
from .trainer_metrics import TrainerMetrics

log = logging.getLogger(__name__)
Entry = tuple[str, Rollout]  # (stream entry id, rollout)


class Intake:
    """This trainer's place in the stream: its consumer name, the cursor over its own pending
    entries, and the groups still waiting for their last members."""

    def __init__(self, config: BelayConfig, queue: RolloutQueue, metrics: TrainerMetrics, persister: Persister):
        self.config, self.section = config, config.trainer
        self.queue, self.metrics, self.persister = queue, metrics, persister
        self.consumer = consumer_name()
        self.pending_cursor: str | None = "0"  # None once this consumer's pending entries are read
        self.partial_groups: dict[str, list[Entry]] = {}  # group baselines need whole groups
        self.data_used_up = False  # set once the actor's data is done and read: the run ends

    def collect(
        self, stop: threading.Event, lineage: Lineage, version: int, seen: Collection[str], between_reads: Callable
    ) -> list[Entry]:
        """batch_size fresh rollouts for the update after `version`; `seen`: the rollout ids already
        trained on; `between_reads` runs before each read (the publisher's catch-up of late replicas).
        Fewer when stopping, or once the actor's data is used up and every rollout has been read."""
        batch: list[Entry] = []
        seen = set(seen)
        self.take_whole_groups(batch)  # groups completed during the last collect come first
        while len(batch) < self.section.batch_size and not stop.is_set():
            between_reads()
            entries = self.read(self.section.batch_size - len(batch))
            if entries is None:
                continue
            if not entries and self.used_up():
                break
            held = {e for e, _ in batch} | {e for group in self.partial_groups.values() for e, _ in group}
            read_at = time.time()
            for entry_id, item in entries:
                if entry_id in held:  # re-delivered while we hold it (e.g. claimed back from ourselves)
                    continue
                if isinstance(item, Rollout):  # time in the stream, from the actor's XADD to this read
                    item.timings["queue"] = max(0.0, read_at - item.timings.get("enqueued_at", read_at))
                if self.persister.holds(entry_id):  # trained into a published version; its persist will ack it
                    continue
                self.admit(entry_id, item, batch, seen, lineage, version)
            self.take_whole_groups(batch)
        return batch

    def used_up(self) -> bool:
        """The actor has used up its data (data.epochs) and no rollout is left unread: none will come.
        Checked after a read came back empty, so the last batch the actor added has been read."""
        if self.pending_cursor is None and self.queue.data_finished() and self.queue.waiting() == 0:
            if not self.data_used_up:
                log.info("the actor's data is used up and every rollout is read: finishing the run")
            self.data_used_up = True
        return self.data_used_up

    def read(self, want: int) -> list | None:
        """Up to `want` entries: our own pending ones first, walked with a cursor; then entries a
        dead trainer left (claimed after claim_idle_ms); then new ones. None: claimed some, read again."""
        redis = self.config.redis
        entries = self.queue.read(
            self.consumer,
            want,
            redis.block_ms,
            pending=self.pending_cursor is not None,
            after=self.pending_cursor or "0",
        )
        if self.pending_cursor is not None:
            self.pending_cursor = entries[-1][0] if entries else None
            if self.pending_cursor is None:  # own pending done: take over what others abandoned
                claimed = self.queue.claim_abandoned(self.consumer, redis.claim_idle_ms, want)
                if claimed:
                    log.warning("claimed %d rollouts a dead trainer left unacknowledged", len(claimed))
                    self.pending_cursor = "0"  # claimed entries are now our pending ones: walk them
                    return None
        return entries

    def admit(
        self,
        entry_id: str,
        item: Rollout | MalformedRollout,
        batch: list[Entry],
        seen: set[str],
        lineage: Lineage,
        version: int,
    ) -> None:
        """Into the batch (or its group), or dropped with its reason."""
        if isinstance(item, MalformedRollout):
            self.drop(entry_id, "malformed", str(item))
        elif item.rollout_id in seen:
            self.queue.ack([entry_id])  # trained on before a crash took the ack: not twice
            self.metrics.dropped.labels(reason="duplicate").inc()
        elif (staleness := lineage.staleness(item.policy_version)) is None:
            self.drop(
                entry_id,
                "orphaned",
                f"version {item.policy_version} is on no branch this trainer "
                f"knows (published by a trainer that died before persisting it, then superseded)",
            )
        elif staleness > self.section.max_staleness:
            self.drop(
                entry_id, "stale", f"version {item.policy_version} is {staleness} updates behind version {version}"
            )
        elif self.section.advantage in ("group", "rloo"):
            self.partial_groups.setdefault(item.group_id, []).append((entry_id, item))
        else:
            batch.append((entry_id, item))

    def take_whole_groups(self, batch: list[Entry]) -> None:
        """Move complete groups into the batch while they fit; the rest wait (still pending) for the next."""
        for group_id, members in list(self.partial_groups.items()):
            whole = len(members) == members[0][1].group_size
            if whole and len(batch) + len(members) <= self.section.batch_size:
                batch.extend(self.partial_groups.pop(group_id))

    def restart(self) -> None:
        """After Redis went away mid-batch: the partial batch is still pending in Redis; read it again."""
        self.pending_cursor, self.partial_groups = "0", {}

    def drop(self, entry_id: str, reason: str, detail: str) -> None:
        """To the dropped stream with its reason (acknowledged there), counted and logged."""
        self.queue.drop(entry_id, reason, detail)
        self.metrics.dropped.labels(reason=reason).inc()
        log.warning("dropped rollout %s (%s): %s", entry_id, reason, detail)
