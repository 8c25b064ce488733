"""services/common/ports.py: free loopback ports for the stacks tests and benches start, picked below
the kernel's ephemeral range and distinct within a call (a system test's policy once met EADDRINUSE
on a port picked by bind(0), the range every outgoing connection draws from)."""

from __future__ import annotations

import socket

import pytest

from services.common import ports
from services.common.ports import LOWEST, ephemeral_start, free_port, free_ports


class Scripted:
    """A stand-in for the port picker's random source that proposes the given ports in order."""

    def __init__(self, proposals: list[int]):
        self.proposals = iter(proposals)

    def randrange(self, start: int, stop: int) -> int:
        port = next(self.proposals)
        assert start <= port < stop
        return port


def test_ports_are_distinct_below_the_ephemeral_range_and_bindable():
    picked = free_ports(20)
    assert len(set(picked)) == 20
    assert all(LOWEST <= port < ephemeral_start() for port in picked)
    listeners = []
    try:
        for port in picked:  # nothing holds them: a server can listen on each
            listener = socket.socket()
            listeners.append(listener)
            listener.bind(("127.0.0.1", port))
            listener.listen()
    finally:
        for listener in listeners:
            listener.close()
    assert LOWEST <= free_port() < ephemeral_start()


def test_a_port_in_use_or_proposed_twice_is_passed_over(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        start = ephemeral_start()
        monkeypatch.setattr(ports, "ephemeral_start", lambda: max(start, busy + 1))
        spare = [port for port in range(LOWEST + 1000, LOWEST + 1100) if port != busy]
        monkeypatch.setattr(ports, "PICK", Scripted([busy, spare[0], spare[0], busy, *spare[1:]]))
        picked = free_ports(3)
    assert busy not in picked and len(set(picked)) == 3
    assert picked[0] == spare[0]  # the first free proposal, kept once


def test_the_ephemeral_range_is_read_from_the_kernel_or_defaults(monkeypatch, tmp_path):
    (tmp_path / "range").write_text("40000\t60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "range")
    assert ephemeral_start() == 40000
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "absent")
    assert ephemeral_start() == 32768  # Linux's default


def test_too_narrow_a_range_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_start", lambda: LOWEST + 5)
    with pytest.raises(RuntimeError, match="too few ports below the ephemeral range"):
        free_ports(3)
