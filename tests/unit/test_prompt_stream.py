"""The actor's walk over its rows (services/policy/prompt_stream.py): every row once per epoch, a
seeded order per epoch, the end after data.epochs, and a position that, saved and read back, continues
the walk exactly where it stopped: the resumed walk equals the uninterrupted one, row for row."""

from __future__ import annotations

import collections
import random

import pytest

from services.common.prompt_data import DataError, PromptRow
from services.policy.prompt_stream import PromptStream

ROWS = [PromptRow(f"prompt {i}", metadata={"answer": i}) for i in range(7)]


def stream(epochs=None, seed=3, shuffle=True, rows=ROWS) -> PromptStream:
    return PromptStream(rows, "rows.jsonl", seed, shuffle, epochs)


def walk(prompts: PromptStream, batch: int) -> list[list[str]]:
    """Batches until the stream is used up."""
    batches = []
    while not prompts.finished:
        batches.append([row.text for row in prompts.take(batch)])
    return batches


def test_each_epoch_takes_every_row_once_in_its_own_order_then_the_walk_ends():
    batches = walk(stream(epochs=3), batch=3)
    taken = [text for batch in batches for text in batch]
    assert len(taken) == 3 * len(ROWS) and [len(b) for b in batches] == [3] * 7  # 21 rows: the last batch full
    epochs = [taken[i * 7 : (i + 1) * 7] for i in range(3)]
    assert all(sorted(epoch) == sorted(r.text for r in ROWS) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # shuffled anew each epoch
    assert walk(stream(epochs=3), batch=3) == batches  # the seed fixes the orders


def test_the_last_batch_is_short_when_the_rows_run_out_and_nothing_follows():
    prompts = stream(epochs=1)
    assert [len(b) for b in walk(prompts, batch=4)] == [4, 3]
    rows, after = prompts.peek(4)
    assert rows == [] and after.finished


def test_without_shuffle_every_epoch_is_in_file_order_and_without_epochs_the_walk_never_ends():
    prompts = stream(shuffle=False)
    taken = [row.text for _ in range(5) for row in prompts.take(3)]
    assert taken == [ROWS[i % 7].text for i in range(15)] and not prompts.finished


def test_peek_moves_nothing_until_the_batch_is_advanced():
    prompts = stream(epochs=2)
    first, after = prompts.peek(5)
    again, _ = prompts.peek(5)  # a failed batch takes the same rows again
    assert first == again and prompts.position.index == 0
    prompts.advance(after)
    assert prompts.position.index == 5 and prompts.peek(5)[0] != first


@pytest.mark.parametrize("stop_after", [1, 2, 3, 4, 5])
def test_a_resumed_walk_neither_repeats_nor_skips_a_row(stop_after):
    whole = walk(stream(epochs=2), batch=3)
    first = stream(epochs=2)
    before = [[row.text for row in first.take(3)] for _ in range(stop_after)]
    saved = first.position.to_record()  # what the actor writes to Redis with each batch
    resumed = stream(epochs=2)
    resumed.resume(saved)
    assert before + walk(resumed, batch=3) == whole
    counts = collections.Counter(text for batch in whole for text in batch)
    assert set(counts.values()) == {2}


def test_a_position_saved_for_other_data_is_refused():
    saved = stream(epochs=2)
    saved.take(3)
    record = saved.position.to_record()
    for other, words in [
        (stream(epochs=2, seed=4), "seed 3"),
        (stream(epochs=2, rows=ROWS[:6]), "written for 7 training rows"),
        (stream(epochs=2, rows=[PromptRow(r.text + "!") for r in ROWS]), "fingerprint"),
        (stream(epochs=2, shuffle=False), "shuffle True"),
    ]:
        with pytest.raises(DataError, match=words):
            other.resume(record)


def test_more_epochs_continue_a_finished_walk_where_it_stopped():
    done = stream(epochs=1)
    walk(done, batch=4)
    more = stream(epochs=2)
    more.resume(done.position.to_record())
    assert not more.finished
    assert sorted(t for batch in walk(more, batch=4) for t in batch) == sorted(r.text for r in ROWS)
    again = stream(epochs=1)
    again.resume(done.position.to_record())
    assert again.finished and again.peek(4)[0] == []


def test_the_order_is_the_one_the_actor_always_cycled_the_prompts_file_in():
    """The old PromptCycle, written out: one random.Random(seed), a shuffled copy per epoch, popped."""
    generator, order, old = random.Random(3), [], []
    for _ in range(3 * len(ROWS)):
        if not order:
            order = [row.text for row in ROWS]
            generator.shuffle(order)
        old.append(order.pop())
    new = stream(seed=3)
    assert [row.text for _ in range(7) for row in new.take(3)] == old
