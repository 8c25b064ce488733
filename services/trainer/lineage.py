"""Staleness counted in updates along the trainer's lineage, not by version number.

Version numbers only grow, even across a crash: a trainer resumed from persisted version P after
its predecessor published P+1..M (never persisted) publishes P's weights again as M+1. So numbers
no longer say how far apart two versions' weights are; the lineage does. Each version this
trainer's history published gets an index, the number of updates from the start of the run to it
(a re-publication of P gets P's index: the same weights).

A rollout's staleness is how many updates separate the weights that sampled it from the weights
about to be trained:
- sampled by a version of the lineage: index(current) - index(version);
- sampled by an orphan, a version P < v <= M the dead trainer published past the persisted P: its
  weights are v - P updates from P along the dead branch, and the current ones
  index(current) - index(P) along ours, so the path between them is the sum. Within max_staleness
  it is trained as off-policy data (its behaviour log-probs are true for the weights that sampled
  it, and the PPO ratio uses them); past it, dropped as stale like any other;
- sampled by a version older than every one remembered: stale (None is never returned for it);
- any other unknown version (an orphan of an earlier crash): None, dropped as "orphaned".
"""

from __future__ import annotations

REMEMBERED_VERSIONS = 1000


class Lineage:
    def __init__(self, index: dict[int, int] | None = None, orphans: tuple[int, int, int] | None = None):
        self.index = dict(index or {0: 0})
        self.orphans = orphans  # (P, M, index of P): versions P < v <= M published by a dead trainer

    @property
    def current(self) -> int:
        return max(self.index.values())

    def advance(self, version: int) -> None:
        """`version` is one update past the current weights."""
        self.index[version] = self.current + 1
        for old in sorted(self.index)[:-REMEMBERED_VERSIONS]:
            del self.index[old]

    def republish(self, version: int, as_version: int) -> None:
        """`as_version` carries the same weights as `version`."""
        self.index[as_version] = self.index[version]

    def orphans_after(self, persisted: int, published: int) -> None:
        self.orphans = (persisted, published, self.index[persisted])

    def staleness(self, version: int) -> int | float | None:
        current = self.current
        if version in self.index:
            return current - self.index[version]
        if self.orphans is not None and self.orphans[0] < version <= self.orphans[1]:
            persisted, _, persisted_index = self.orphans
            return (version - persisted) + (current - persisted_index)
        if version < min(self.index):
            return float("inf")
        return None

    def state(self) -> dict:
        return {
            "index": {str(v): i for v, i in self.index.items()},
            "orphans": list(self.orphans) if self.orphans else None,
        }

    @classmethod
    def from_state(cls, state: dict | None, version: int) -> Lineage:
        """From a checkpoint's meta; checkpoints written before lineages (format 1) numbered every
        version consecutively, one per update, so their numbers are their indexes."""
        if state is None:
            return cls({v: v for v in range(max(0, version - REMEMBERED_VERSIONS + 1), version + 1)})
        orphans = tuple(state["orphans"]) if state.get("orphans") else None
        return cls({int(v): int(i) for v, i in state["index"].items()}, orphans)
