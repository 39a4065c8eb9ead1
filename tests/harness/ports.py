"""Free TCP ports for the servers the tests start, chosen below the kernel's ephemeral range.

A port that bind(0) hands out is free when it is handed out, but the server that is meant to
take it binds a second or so later (a Python process starting up): meanwhile any outgoing
connection on this machine may get the same port as its local end, and the server then fails
with "address in use". Ports below /proc/sys/net/ipv4/ip_local_port_range are never given to
outgoing connections, so only another test's choice could collide, and they pick at random.
"""

from __future__ import annotations

import random
import socket
from functools import cache

__all__ = ["free_port"]

_LOWEST = 10000


@cache
def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(family: int, host: str, port: int) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1", *, ipv6_too: bool = False) -> int:
    """A TCP port free on `host` now (and on ::1 as well, with ipv6_too)."""
    top = max(_ephemeral_start() - 1, _LOWEST + 1000)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(500):
        port = random.randint(_LOWEST, top)
        if not _bindable(family, host, port):
            continue
        if ipv6_too and not _bindable(socket.AF_INET6, "::1", port):
            continue
        return port
    raise OSError("no free port found")
