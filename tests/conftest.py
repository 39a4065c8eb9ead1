"""Shared fixtures. Keep the logic in tests/harness/; this file only wires it to pytest."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping

import hypothesis
import pytest

from harness import hostguard, leaks, sidecar, skips
from harness.postfix import PostfixInstance, postfix_available
from harness.sink import SmtpSink

PostfixFactory = Callable[..., PostfixInstance]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-skips",
        action="store_true",
        help="a skip fails unless the machine cannot have what it needs (harness/skips.py); "
        "also on when CI is true",
    )


def pytest_configure(config: pytest.Config) -> None:
    """No test reads host configuration it did not create (harness/hostguard.py)."""
    hostguard.install()
    # Property tests check what comes out, not how fast: no per-example deadline and no
    # "too slow" health check, both of which a loaded 2-core machine trips now and then.
    hypothesis.settings.register_profile(
        "suite", deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
    )
    hypothesis.settings.load_profile("suite")
    strict = config.getoption("--no-skips") or skips.strict_from_env()
    config.pluginmanager.register(skips.Judge(strict), "skips")


@pytest.fixture(scope="session", autouse=True)
def no_secret_leaked_anywhere() -> Iterator[None]:
    """After the whole run: no key material and no Redis password in any sidecar log,
    exception text or HTTP answer (metrics, health) of any test (harness/leaks.py)."""
    yield
    sidecar.kill_leftovers()  # of tests that failed before stopping theirs
    found = leaks.find_leaks()
    assert not found, "secrets leaked:\n" + "\n".join(found[:20])


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A started byte-exact SMTP sink on 127.0.0.1 (random port)."""
    sink = SmtpSink().start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
def postfix_factory() -> Iterator[PostfixFactory]:
    """``make(milters="", extra_main_cf=None, **kw)`` -> a started PostfixInstance that
    relays to its own fresh SmtpSink (``instance.sink``). Everything is stopped and removed
    at teardown. ``kw`` goes to PostfixInstance (milter_default_action, extra_mynetworks,
    ipv6)."""
    if not postfix_available():
        pytest.skip("Postfix is not installed (/usr/sbin/postfix missing)")
    if os.geteuid() != 0:
        pytest.fail("the Postfix harness must run as root (it starts a real master)")
    made: list[tuple[PostfixInstance, SmtpSink]] = []

    def make(
        milters: str = "",
        extra_main_cf: Mapping[str, str] | None = None,
        *,
        milter_default_action: str = "accept",
        extra_mynetworks: Iterable[str] = (),
        ipv6: bool | None = None,
    ) -> PostfixInstance:
        sink = SmtpSink().start()
        instance = PostfixInstance(
            sink.port,
            milters,
            milter_default_action=milter_default_action,
            extra_main_cf=extra_main_cf,
            extra_mynetworks=extra_mynetworks,
            ipv6=ipv6,
        )
        instance.sink = sink
        made.append((instance, sink))
        instance.start()
        return instance

    try:
        yield make
    finally:
        for instance, sink in reversed(made):
            instance.cleanup()
            sink.stop()
