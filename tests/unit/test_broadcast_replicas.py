"""Whom the in-memory transports send to: the registry's replicas of the transport, one per address;
catch_up sends only to replicas not sent the version yet, and a replica whose
sends keep failing is tried again after a back-off that doubles up to a cap."""

from __future__ import annotations

from services.trainer.broadcast import MAX_RETRY_SECONDS, RETRY_AFTER_FAILURE_SECONDS, ReplicaGroup, receivers


def test_a_replica_already_sent_the_version_is_not_sent_it_again():
    group = ReplicaGroup("127.0.0.1:1")
    assert group.may_catch_up(1, now=0.0)
    group.sent_version = 1
    assert not group.may_catch_up(1, now=0.0)
    assert group.may_catch_up(2, now=0.0)


def test_the_back_off_after_failures_doubles_and_is_capped():
    for failures, wait in [
        (1, RETRY_AFTER_FAILURE_SECONDS),
        (2, 2 * RETRY_AFTER_FAILURE_SECONDS),
        (3, 4 * RETRY_AFTER_FAILURE_SECONDS),
        (20, MAX_RETRY_SECONDS),
    ]:
        group = ReplicaGroup("127.0.0.1:1", failed_at=1000.0, failures=failures)
        assert not group.may_catch_up(1, now=1000.0 + wait - 0.1), failures
        assert group.may_catch_up(1, now=1000.0 + wait), failures


def test_receivers_are_the_replicas_of_the_transport_one_per_address_the_newest_report_kept():
    records = {
        "host:1": {"version": 3, "address": "10.0.0.1:50051", "transport": "broadcast", "time": 100.0},
        "host:2": {"version": 0, "address": "10.0.0.1:50051", "transport": "broadcast", "time": 200.0},
        "other:1": {"version": 3, "address": "10.0.0.2:50051", "transport": "file", "time": 300.0},
        "nowhere:1": {"version": 3, "address": "", "transport": "broadcast", "time": 300.0},
        "host:9": {"version": 3, "address": "10.0.0.3:50051", "transport": "broadcast", "time": 50.0},
    }
    assert set(receivers(records, "broadcast")) == {"host:2", "host:9"}  # host:1 restarted as host:2
    assert set(receivers(records, "cuda_ipc")) == set()
