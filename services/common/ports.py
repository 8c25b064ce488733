"""Free loopback ports for the stacks the benches and tests start (each stack its own ports).

A port the kernel hands out for bind(port 0) comes from the ephemeral range, the same range every
outgoing connection takes its local port from: between the pick and the service's own bind, a gRPC
or Redis client anywhere on the machine may take it, and the service fails with EADDRINUSE (a
system test's policy did, 2026-11-30). Two picks in a row may also return the same port. So ports
are picked below the ephemeral range (net.ipv4.ip_local_port_range: no outgoing connection uses
them), at random, each checked bindable, all held until every one of a stack's is chosen.
"""

from __future__ import annotations

import contextlib
import pathlib
import random
import socket

LOWEST = 20000  # above the registered ports most servers default to (redis 6379, prometheus 9090, ...)
EPHEMERAL_RANGE = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range")
PICK = random.SystemRandom()  # not the random module's own state, which a test or a run may seed


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's default 32768 where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports on `host` that nothing listens on now, below the ephemeral range."""
    end = ephemeral_start()
    if end - LOWEST < 10 * count:
        raise RuntimeError(f"too few ports below the ephemeral range (it starts at {end}) to pick {count}")
    chosen: dict[int, socket.socket] = {}
    with contextlib.ExitStack() as held:
        for _ in range(100 * count):
            if len(chosen) == count:
                break
            port = PICK.randrange(LOWEST, end)
            if port in chosen:
                continue
            sock = held.enter_context(socket.socket())
            try:
                sock.bind((host, port))
            except OSError:
                continue  # taken: try another
            chosen[port] = sock
        if len(chosen) < count:
            raise RuntimeError(f"found {len(chosen)} of {count} free ports between {LOWEST} and {end}")
    return list(chosen)


def free_port(host: str = "127.0.0.1") -> int:
    """One port nothing listens on now, below the ephemeral range."""
    return free_ports(1, host)[0]
