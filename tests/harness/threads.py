"""Client threads whose failures reach the test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def call_in_thread(fn: Callable[[], T], timeout: float = 60) -> T:
    """fn() in a thread: its result, or its exception raised here. A call that never returns
    fails the test after `timeout` seconds (generous: how fast is for the benchmarks) instead of
    hanging the suite."""
    done: list[T] = []
    run_threads(1, lambda _: done.append(fn()), timeout=timeout)
    return done[0]


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
    alive = sum(t.is_alive() for t in threads)
    # a failure first: it is often why the others hang
    if errors:
        if alive:
            errors[0].add_note(f"and {alive} of {n} client threads did not finish in {timeout} s")
        raise errors[0]
    assert not alive, f"{alive} of {n} client threads did not finish in {timeout} s"
