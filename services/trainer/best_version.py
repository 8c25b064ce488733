"""The best persisted version by the held-out evaluation: <checkpoint_dir>/best.json.

The policy evaluates every trainer.eval_every versions (services/policy/heldout_eval.py) and keeps
the figures in Redis; the trainer, after each step, marks the version with the highest
trainer.eval_metric among those that are both evaluated and persisted, writing
{"version", "metric", "value", "path", "time"} atomically (temp file, fsync, rename). Pruning keeps the
marked version (persisting.py), so a user can always load it: `belay eval <path>`, or serve it.
Ties go to the older version: the same figure nearer the reference.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time

from ..common.checkpoints import committed_versions
from ..common.review_store import ReviewStore
from ..common.strict_json import strict_json

log = logging.getLogger(__name__)

BEST_FILE = "best.json"


def best_of(evals: dict[int, dict], persisted: set[int], metric: str) -> tuple[int, float] | None:
    """(version, value) with the highest finite `metric` among evaluated versions that are persisted."""
    candidates = [
        (value, -version)
        for version, record in evals.items()
        if version in persisted
        and isinstance(value := record.get(metric), (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    ]
    if not candidates:
        return None
    value, negative_version = max(candidates)
    return -negative_version, float(value)


def read_best(root: str | os.PathLike) -> dict | None:
    """The marked best version's record, or None (no mark yet, or an unreadable one: said in the log)."""
    path = pathlib.Path(root) / BEST_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        int(record["version"])
        return record
    except (ValueError, KeyError, TypeError) as error:
        log.warning("%s is unreadable (%s): the best version will be marked again", path, error)
        return None


def marked_versions(root: str | os.PathLike) -> set[int]:
    """The versions pruning must keep: the best one, when marked."""
    record = read_best(root)
    return {int(record["version"])} if record else set()


def write_best(root: str | os.PathLike, record: dict) -> None:
    path = pathlib.Path(root) / BEST_FILE
    temporary = path.with_suffix(".json.tmp")
    with open(temporary, "w") as file:
        file.write(strict_json(record))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class BestVersion:
    def __init__(self, root: str | os.PathLike, store: ReviewStore, metric: str):
        self.root, self.store, self.metric = pathlib.Path(root), store, metric
        self.marked = read_best(self.root)

    def update(self) -> dict | None:
        """Mark a new best version if one appeared; returns the new mark, or None."""
        persisted = dict(committed_versions(self.root))
        best = best_of(self.store.evals(), set(persisted), self.metric)
        if best is None:
            return None
        version, value = best
        if self.marked and (self.marked["version"], self.marked["metric"]) == (version, self.metric):
            return None
        self.marked = {"version": version, "metric": self.metric, "value": value, "path": str(persisted[version])}
        self.marked["time"] = time.time()
        write_best(self.root, self.marked)
        log.info("best version by held-out %s: %d (%.4f), marked in %s", self.metric, version, value, BEST_FILE)
        return self.marked
