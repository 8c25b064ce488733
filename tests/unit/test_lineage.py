"""Staleness counted in updates along the trainer's lineage (services/trainer/lineage.py)."""

from __future__ import annotations

import math

from services.trainer.lineage import Lineage


def test_along_one_lineage_staleness_is_the_number_of_updates_since():
    lineage = Lineage()
    for version in range(1, 6):
        lineage.advance(version)
    assert [lineage.staleness(v) for v in range(6)] == [5 - v for v in range(6)]


def test_after_a_resume_past_orphans_the_path_through_the_persisted_version_counts():
    # Persisted at 3, the dead trainer published 4 and 5; the resumed one publishes 3's weights as 6.
    lineage = Lineage.from_state(None, 3)
    lineage.orphans_after(3, 5)
    lineage.republish(3, 6)
    assert lineage.staleness(6) == 0 and lineage.staleness(3) == 0  # the same weights
    assert lineage.staleness(4) == 1 and lineage.staleness(5) == 2  # one and two updates down the dead branch
    lineage.advance(7)
    # independently: path length = (orphan - persisted) + updates since the resume
    for orphan in (4, 5):
        assert lineage.staleness(orphan) == (orphan - 3) + 1
    assert lineage.staleness(7) == 0 and lineage.staleness(6) == 1 and lineage.staleness(2) == 2


def test_unknown_versions_are_orphaned_or_older_than_remembered():
    lineage = Lineage({10: 0, 12: 1})  # 11 was an orphan of an earlier crash, forgotten
    assert lineage.staleness(11) is None
    assert lineage.staleness(3) == math.inf


def test_state_round_trips_and_format_1_numbers_are_indexes():
    lineage = Lineage.from_state(None, 4)
    assert [lineage.staleness(v) for v in range(5)] == [4, 3, 2, 1, 0]
    lineage.orphans_after(4, 6)
    lineage.republish(4, 7)
    lineage.advance(8)
    again = Lineage.from_state(lineage.state(), 8)
    assert again.index == lineage.index and again.orphans == lineage.orphans
    assert [again.staleness(v) for v in range(9)] == [lineage.staleness(v) for v in range(9)]
