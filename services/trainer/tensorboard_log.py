"""TensorBoard event files of a run (run.tensorboard_dir, off by default), so a Belay run can sit next
to a TRL or veRL run in the tools people already use: `tensorboard --logdir <tensorboard_dir>`.

One subdirectory per run name, <tensorboard_dir>/<run.name>. At global step = the policy version:
- every numeric field of each step record as a scalar: update/<UpdateStats field>, detectors/<field>,
  seconds/<stage>, reward_components/<part>, run/<rollouts, publish_bytes, ...>; the batch's first
  sample as text (sample); a KL rollback's fields as rollback/<field>;
- each version's canary answers (the policy's review-store record) as text (canaries/answers), its
  numeric top-level fields as canaries/<field> and each per-prompt list of numbers as
  canaries/<field>/prompt_<i>, whatever fields the policy writes.

Canary records are read with one HMGET per step, for the versions not written yet (at most
CANARY_LOOKBACK of them). Writing is a side channel: a failure (disk full, Redis away) is logged once
as a warning and never stops training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from collections.abc import Callable
from numbers import Real

from ..common.config import BelayConfig
from ..common.review_store import ReviewStore
from ..common.step_records import RollbackRecord, StepRecord

log = logging.getLogger(__name__)

CANARY_LOOKBACK = 16  # versions one canary check reaches back over: a policy far behind loses the oldest
NOT_SCALARS = ("version", "time")  # the step and the wall time of a point, not values of it


def is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def numeric_fields(data: dict, prefix: str, per_item_lists: bool = False) -> dict[str, float]:
    """Tag -> value for every finite number in `data` (booleans as 0/1), nested dicts as prefix/key/...;
    with per_item_lists, a list of numbers as prefix/key/prompt_<i> and a list of dicts as
    prefix/key/<field>/prompt_<i>. Everything else is skipped."""
    scalars = {}
    for key, value in data.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, bool) or is_number(value):
            scalars[tag] = float(value)
        elif isinstance(value, dict):
            scalars.update(numeric_fields(value, tag, per_item_lists))
        elif per_item_lists and isinstance(value, list) and value and all(is_number(v) for v in value):
            scalars.update({f"{tag}/prompt_{i}": float(v) for i, v in enumerate(value)})
        elif per_item_lists and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):  # the canary record's signals: one dict per prompt
                scalars.update({f"{name}/prompt_{i}": number for name, number in numeric_fields(item, tag).items()})
    return scalars


def step_scalars(record: StepRecord) -> dict[str, float]:
    """Every numeric field of a step record, tagged by the part of the record it comes from."""
    top = {
        f.name: getattr(record, f.name)
        for f in dataclasses.fields(record)
        if f.name not in NOT_SCALARS and is_number(getattr(record, f.name))
    }
    return {
        **numeric_fields(dataclasses.asdict(record.stats), "update"),
        **numeric_fields(dataclasses.asdict(record.detectors), "detectors"),
        **numeric_fields(dataclasses.asdict(record.seconds), "seconds"),
        **numeric_fields(record.reward_components, "reward_components"),
        **numeric_fields({**top, "detectors_firing": len(record.detectors_firing)}, "run"),
    }


def code_block(text: str) -> str:
    """`text` as a Markdown indented code block: shown verbatim, whatever characters it holds."""
    return "\n".join("    " + line for line in (str(text).splitlines() or [""]))


def canary_text(record: dict) -> str:
    """Markdown of a canary record: each prompt and this version's greedy answer."""
    pairs = zip(record.get("prompts", []), record.get("outputs", []))
    return "\n\n".join(
        f"**prompt {i}**\n\n{code_block(prompt)}\n\n**answer**\n\n{code_block(answer)}"
        for i, (prompt, answer) in enumerate(pairs)
    )


class TensorBoardLog:
    """A SummaryWriter and the newest canary version written; every write guarded."""

    def __init__(self, writer, store: ReviewStore | None):
        self.writer, self.store = writer, store
        self.canaries_written: int | None = None  # newest version whose canaries are in the event files
        self.warned = False

    @classmethod
    def from_config(cls, config: BelayConfig, store: ReviewStore | None) -> TensorBoardLog | None:
        """The writer for run.tensorboard_dir/run.name, or None when off or the directory cannot be made."""
        if config.run.tensorboard_dir is None:
            return None
        directory = pathlib.Path(config.run.tensorboard_dir) / config.run.name
        try:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

            writer = SummaryWriter(log_dir=str(directory))
        except Exception as error:  # a side channel: training goes on without it
            log.warning("TensorBoard event files off: cannot write in %s (%s)", directory, error)
            return None
        log.info("TensorBoard event files in %s (tensorboard --logdir %s)", directory, config.run.tensorboard_dir)
        return cls(writer, store)

    def guarded(self, what: str, write: Callable[[], None]) -> None:
        """write(), then flush, so the files are current after every step; a failure is logged once."""
        try:
            write()
            self.writer.flush()
        except Exception as error:  # never stops training (disk full, Redis away, ...)
            if not self.warned:
                log.warning(
                    "TensorBoard: could not write %s (%s); training goes on, later failures unlogged", what, error
                )
                self.warned = True

    def write_step(self, record: StepRecord) -> None:
        def write() -> None:
            for tag, value in step_scalars(record).items():
                self.writer.add_scalar(tag, value, record.version, walltime=record.time)
            sample = record.sample
            text = f"**prompt**\n\n{code_block(sample.prompt)}\n\n**response** (reward {sample.reward:.4g})\n\n"
            self.writer.add_text("sample", text + code_block(sample.response), record.version, walltime=record.time)

        self.guarded(f"step {record.version}", write)

    def write_rollback(self, record: RollbackRecord) -> None:
        data = {k: v for k, v in dataclasses.asdict(record).items() if k not in NOT_SCALARS}

        def write() -> None:
            for tag, value in numeric_fields(data, "rollback").items():
                self.writer.add_scalar(tag, value, record.version, walltime=record.time)

        self.guarded(f"the rollback at version {record.version}", write)

    def write_new_canaries(self, version: int) -> None:
        """The canary records that appeared since the last check, up to `version`: one HMGET. The first
        check looks at version - 1 and version only (a resumed run's older ones are written already)."""
        if self.store is None:
            return
        first = version - 1 if self.canaries_written is None else self.canaries_written + 1
        versions = list(range(max(first, version - CANARY_LOOKBACK + 1, 0), version + 1))

        def write() -> None:
            for canary_version, record in self.store.canaries_at(versions).items():
                walltime = record.get("time")
                self.writer.add_text("canaries/answers", canary_text(record), canary_version, walltime=walltime)
                fields = {k: v for k, v in record.items() if k not in NOT_SCALARS and k != "degenerate"}
                if isinstance(record.get("degenerate"), list):  # indices of the degenerate answers: their count
                    fields["degenerate_count"] = len(record["degenerate"])
                for tag, value in numeric_fields(fields, "canaries", per_item_lists=True).items():
                    self.writer.add_scalar(tag, value, canary_version, walltime=walltime)
                self.canaries_written = canary_version

        self.guarded(f"the canaries up to version {version}", write)

    def close(self) -> None:
        self.guarded("the last events", self.writer.close)
