"""Loopback ports for the tests' servers, picked where nothing else takes them meanwhile.

A test picks a free port and its server binds it a moment later. A port of the kernel's ephemeral
range (ip_local_port_range, 32768-60999 by default) may be handed in between to any client's
outgoing connection or to another bind(0), and two pytest-xdist workers, each with a control plane
and its processes, make many of those. So ports come from below that range, where only explicit
binders go: from HIBERNATE_PORT_RANGE (`LO-HI`) where it is set, else from 20000 up to the ephemeral
range. tests/conftest.py gives each xdist worker a part of its own (hack/start-control-plane.sh picks
from it too), and within one process the picks go round the range, so that two picks of one test
differ even before either is bound.
"""

from __future__ import annotations

import os
import random
import socket
import threading

ENV = "HIBERNATE_PORT_RANGE"
DEFAULT_LOW = 20000
MIN_SIZE = 100  # a smaller range is no range: bind(0) then

_lock = threading.Lock()
_next: dict[tuple[int, int], int] = {}


def ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_range() -> tuple[int, int]:
    """(low, high), both included: HIBERNATE_PORT_RANGE, else 20000 up to the ephemeral range."""
    given = os.environ.get(ENV)
    if given:
        low, _, high = given.partition("-")
        return int(low), int(high)
    return DEFAULT_LOW, ephemeral_low() - 1


def worker_range(worker: str, count: int) -> str:
    """The part of port_range() that xdist worker `worker` (gw0, gw1, ...) of `count` picks from."""
    low, high = port_range()
    index = int(worker.removeprefix("gw"))
    size = (high - low + 1) // max(count, 1)
    return f"{low + index * size}-{low + (index + 1) * size - 1}"


def _bindable(port: int) -> int | None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return None
        bound: int = sock.getsockname()[1]
        return bound


def free_port() -> int:
    """A loopback port that is free now, from port_range(), the next one after this process's last."""
    low, high = port_range()
    if high - low + 1 >= MIN_SIZE:
        size = high - low + 1
        with _lock:
            start = _next.get((low, high), random.randint(low, high))
            for step in range(size):
                port = low + (start - low + step) % size
                if _bindable(port) is not None:
                    _next[(low, high)] = low + (port - low + 1) % size
                    return port
    port = _bindable(0)
    if port is None:
        raise OSError("no free loopback port")
    return port
