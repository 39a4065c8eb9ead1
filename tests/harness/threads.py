"""Client threads whose failures reach the test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def run_threads(n: int, target: Callable[[int], None], timeout: float = 120) -> None:
    """n threads running target(i); every exception is raised here (a thread that dies on its
    own would only print it, and the test would pass)."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # carried to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "client threads did not finish in time"
    if errors:
        raise errors[0]
