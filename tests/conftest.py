"""Shared fixtures. Keep the logic in tests/harness/; this file only wires it to pytest."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

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
    config.stash[_STRICT] = config.getoption("--no-skips") or skips.strict_from_env()
    config.stash[_SKIPPED] = []


_STRICT = pytest.StashKey[bool]()
_SKIPPED = pytest.StashKey[list[tuple[str, str, bool]]]()


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def _judge_skip(config: pytest.Config, report: pytest.TestReport | pytest.CollectReport) -> None:
    """Record every skip; in strict mode turn one that is not a machine limit into a failure."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    allowed = skips.is_machine_limit(reason)
    strict = config.stash[_STRICT]
    config.stash[_SKIPPED].append((report.nodeid, reason, allowed or not strict))
    if strict and not allowed:
        report.outcome = "failed"
        report.longrepr = (
            f"skipped, and a skip here hides a regression: {reason}\n"
            "`make test` installs every part the suite needs, so this one is missing or broken. "
            "Only what the machine cannot have may skip (harness/skips.machine_cannot)."
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _judge_skip(item.config, outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _judge_skip(collector.config, outcome.get_result())


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Every run says what it did not check."""
    skipped = config.stash[_SKIPPED]
    mode = "strict" if config.stash[_STRICT] else "not strict: skips pass"
    terminalreporter.section(f"skips ({mode})", sep="-")
    if not skipped:
        terminalreporter.line("no test skipped")
    for nodeid, reason, allowed in skipped:
        verdict = "skipped" if allowed else "FAILED "
        terminalreporter.line(f"{verdict} {nodeid}: {reason}")


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
