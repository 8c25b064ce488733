"""catch_up's choice of whom to send to: only replicas not sent the version yet, and a replica whose
sends keep failing is tried again after a back-off that doubles up to a cap."""
from __future__ import annotations

from services.trainer.broadcast import MAX_RETRY_SECONDS, RETRY_AFTER_FAILURE_SECONDS, ReplicaGroup


def test_a_replica_already_sent_the_version_is_not_sent_it_again():
    group = ReplicaGroup("127.0.0.1:1")
    assert group.may_catch_up(1, now=0.0)
    group.sent_version = 1
    assert not group.may_catch_up(1, now=0.0)
    assert group.may_catch_up(2, now=0.0)


def test_the_back_off_after_failures_doubles_and_is_capped():
    for failures, wait in [(1, RETRY_AFTER_FAILURE_SECONDS), (2, 2 * RETRY_AFTER_FAILURE_SECONDS),
                           (3, 4 * RETRY_AFTER_FAILURE_SECONDS), (20, MAX_RETRY_SECONDS)]:
        group = ReplicaGroup("127.0.0.1:1", failed_at=1000.0, failures=failures)
        assert not group.may_catch_up(1, now=1000.0 + wait - 0.1), failures
        assert group.may_catch_up(1, now=1000.0 + wait), failures
