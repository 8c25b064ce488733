"""The actor's walk over its training rows: every row once per epoch, each epoch in its own order
(the next shuffle of one random.Random(seed) stream, taken from the end: the order the actor has
always cycled policy.prompts_file in; or file order without data.shuffle), for data.epochs epochs or
for ever.

The position (epoch, index into that epoch's order) is part of the run's persisted state: the actor
writes it to Redis in the same transaction as the batch's rollouts (RolloutQueue.add_all), so the
stream holds a batch exactly when the position has moved past its rows, and a restarted actor reads
it back: a resumed run neither repeats nor skips a row. After the last epoch it says `finished`."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, replace

from ..common.prompt_data import DataError, PromptData, PromptRow, data_seed


@dataclass(frozen=True)
class DataPosition:
    """Where the next batch starts. `rows`, `seed`, `shuffle` and `fingerprint` (of the rows' prompts)
    say which walk it belongs to, so a position saved for other data is refused rather than applied."""

    epoch: int
    index: int
    rows: int
    seed: int
    shuffle: bool
    fingerprint: str
    source: str
    finished: bool = False

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> DataPosition:
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})


def rows_fingerprint(rows: list[PromptRow]) -> str:
    """sha256 over the rows' prompts (text and messages), in order: the same data gives the same one."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row.text, row.messages]).encode() + b"\n")
    return digest.hexdigest()[:16]


class EpochOrders:
    """The row indices of each epoch, in the order they are taken: epoch e's is the (e+1)-th shuffle
    of random.Random(seed), reversed (the actor used to pop from the end). The generator is kept
    between epochs, so walking forward costs one shuffle per epoch; a resume replays the epochs before."""

    def __init__(self, rows: int, seed: int, shuffle: bool):
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.epoch, self.current, self.generator = -1, [], random.Random(seed)

    def __call__(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.rows))
        if epoch < self.epoch:
            self.epoch, self.generator = -1, random.Random(self.seed)
        while self.epoch < epoch:
            order = list(range(self.rows))
            self.generator.shuffle(order)
            self.epoch, self.current = self.epoch + 1, order[::-1]
        return self.current


class PromptStream:
    """Rows in batches: peek() says what the next batch holds and where it leaves the position;
    the actor moves to it (advance) only once the batch is in the stream."""

    def __init__(self, rows: list[PromptRow], source: str, seed: int, shuffle: bool, epochs: int | None):
        if not rows:
            raise DataError(f"{source} holds no training rows")
        self.rows, self.epochs = rows, epochs
        self.position = DataPosition(0, 0, len(rows), seed, shuffle, rows_fingerprint(rows), source)
        self.order = EpochOrders(len(rows), seed, shuffle)

    @classmethod
    def from_data(cls, data: PromptData, config) -> PromptStream:
        section = config.data
        return cls(data.train, data.source, data_seed(config), section.shuffle, section.epochs)

    @property
    def finished(self) -> bool:
        return self.position.finished

    def peek(self, count: int) -> tuple[list[PromptRow], DataPosition]:
        """Up to `count` rows from the position on, crossing into the next epoch as needed; fewer at
        the end of the last epoch (none once finished). The position after them, not yet taken."""
        epoch, index, taken = self.position.epoch, self.position.index, []
        while len(taken) < count and not self.position.finished:
            if index == len(self.rows):
                epoch, index = epoch + 1, 0
            if self.epochs is not None and epoch >= self.epochs:
                break
            order = self.order(epoch)
            step = min(count - len(taken), len(order) - index)
            taken += [self.rows[i] for i in order[index : index + step]]
            index += step
        if index == len(self.rows) and self.epochs is not None and epoch + 1 >= self.epochs:
            epoch, index = epoch + 1, 0
        done = self.position.finished or (self.epochs is not None and epoch >= self.epochs)
        return taken, replace(self.position, epoch=epoch, index=index, finished=done)

    def advance(self, position: DataPosition) -> None:
        self.position = position

    def take(self, count: int) -> list[PromptRow]:
        """peek() and advance() at once, for a caller with nothing to commit (the bench)."""
        rows, after = self.peek(count)
        self.advance(after)
        return rows

    def resume(self, record: dict | None) -> None:
        """Continue from a saved position (None: from the start). DataError when it was saved for other data."""
        if not record:
            return
        try:
            saved = DataPosition.from_record(record)
        except (KeyError, TypeError) as error:
            raise DataError(f"the saved data position {record} is not one: {error}") from None
        ours = self.position
        walk = ("rows", "seed", "shuffle", "fingerprint")
        if any(getattr(saved, name) != getattr(ours, name) for name in walk):
            raise DataError(
                f"the run's saved data position was written for {saved.rows} training rows of {saved.source} "
                f"(seed {saved.seed}, shuffle {saved.shuffle}, fingerprint {saved.fingerprint}); this config gives "
                f"{ours.rows} rows of {ours.source} (seed {ours.seed}, shuffle {ours.shuffle}, fingerprint "
                f"{ours.fingerprint}). Resuming would repeat or skip rows: restore that data, or start a new run "
                "(another run.name, or delete the run's data_position key in Redis)"
            )
        if not 0 <= saved.index <= saved.rows or saved.epoch < 0:
            raise DataError(f"the saved data position {record} lies outside {saved.rows} rows")
        # data.epochs decides, not the saved flag: raising it continues a finished run where it stopped
        finished = self.epochs is not None and saved.epoch >= self.epochs
        self.position = replace(ours, epoch=saved.epoch, index=saved.index, finished=finished)
