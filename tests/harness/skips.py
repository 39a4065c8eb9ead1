"""A skip must not hide a regression.

`make test` installs every part the suite drives (Postfix, Redis, rspamd, the Docker engine,
debootstrap, a C compiler...). When one of them is missing or does not start, the tests that
need it would skip and the run would still be green, with the image, the Mailcow chain or the
Postfix oracle unchecked. So, in strict mode, a skip (or an expected failure) is a failure
unless it is for something the machine truly cannot have (a CPU feature, IPv6 on loopback, a
kernel facility): those skips go through `machine_cannot`, and say so.

Strict mode is on under `make test` (``--no-skips``) and whenever ``CI`` is set to a true value,
as CI services do. Every run ends with the list of what was skipped and why, strict or not.
`Judge` is the pytest plugin that does this; conftest.py registers it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import pytest

__all__ = ["MACHINE", "Judge", "is_machine_limit", "machine_cannot", "strict_from_env"]

# The prefix of every skip reason that strict mode lets through.
MACHINE = "this machine cannot: "

_WHY = (
    "`make test` installs every part the suite needs, so this one is missing or broken. "
    "Only what the machine cannot have may skip (harness/skips.machine_cannot)."
)


def machine_cannot(reason: str) -> NoReturn:
    """Skip for something the machine cannot have, whatever is installed (never for a part
    `make test` installs: use pytest.skip or, better, fail)."""
    pytest.skip(MACHINE + reason)


def is_machine_limit(reason: str) -> bool:
    return reason.startswith(MACHINE)


def strict_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """CI services set CI=true (GitHub Actions, GitLab, Woodpecker...); a run there is strict."""
    return environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    if hasattr(report, "wasxfail"):
        return f"expected to fail: {report.wasxfail or '(no reason given)'}"
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


class Judge:
    """Records every skip and expected failure; in strict mode, one that is not a machine limit
    fails its test (a skipped module, which pytest cannot fail without stopping the whole
    collection, fails the run instead)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.seen: list[tuple[str, str, bool]] = []  # (node id, reason, allowed)

    def _judge(self, report: pytest.TestReport | pytest.CollectReport) -> bool:
        """Whether this report is a skip strict mode refuses."""
        if not report.skipped:
            return False
        reason = _reason(report)
        allowed = is_machine_limit(reason) or not self.strict
        self.seen.append((report.nodeid, reason, allowed))
        return not allowed

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item) -> Iterator[None]:
        outcome = yield
        report = outcome.get_result()
        if self._judge(report):
            report.outcome = "failed"
            report.longrepr = (
                f"skipped, and a skip here hides a regression: {_reason(report)}\n{_WHY}"
            )
            if hasattr(report, "wasxfail"):
                del report.wasxfail

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(self) -> Iterator[None]:
        outcome = yield
        self._judge(outcome.get_result())  # the run's exit status says it (below)

    def refused(self) -> list[tuple[str, str, bool]]:
        return [seen for seen in self.seen if not seen[2]]

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.refused() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """Every run says what it did not check."""
        mode = "strict" if self.strict else "not strict: skips pass"
        terminalreporter.section(f"skips ({mode})", sep="-")
        if not self.seen:
            terminalreporter.line("no test skipped")
        for nodeid, reason, allowed in self.seen:
            terminalreporter.line(f"{'skipped' if allowed else 'FAILED '} {nodeid}: {reason}")
        if self.refused():
            terminalreporter.line(
                f"{len(self.refused())} skip(s) refused in strict mode: the run fails"
            )
