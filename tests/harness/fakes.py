"""Stand-ins for what a test cannot control otherwise: a DNS that answers from a table (and
slowly, if asked), and a clock that moves only when told."""

from __future__ import annotations

import socket
import time


class FakeDns:
    def __init__(self, delay: float = 0.0) -> None:
        self.records: dict[str, set[str]] = {}
        self.asked = 0
        self.delay = delay  # a slow DNS answer: the held peer must wait for it, unread

    def __call__(self, name: str) -> set[str]:
        self.asked += 1
        time.sleep(self.delay)
        if name not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.records[name]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
