"""Tests read no host configuration they did not create.

A fresh machine has none of what an earlier run, a package's post-install step or an admin
left behind: Postfix installed with "No configuration" has no /etc/postfix/main.cf, and no
/etc/dkim-sidecar exists. A test that reads such a file passes on the machine that has it and
fails on every other one, so the whole session is guarded:

- Postfix tools: ``MAIL_CONFIG`` points to a directory that does not exist, so a postfix,
  postconf or postmap run without ``-c DIR`` fails at once, naming this rule in its error
  ("fatal: open /nonexistent/give-postfix-tools--c-DIR-of-the-test/main.cf").
- Python in the test process: an audit hook makes ``open()`` of a guarded path raise
  HostStateError. Only in-process opens are seen; subprocesses get their files by argument.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["GUARDED", "NO_MAIL_CONFIG", "HostStateError", "install"]

NO_MAIL_CONFIG = "/nonexistent/give-postfix-tools--c-DIR-of-the-test"

# Configuration of the programs the suite runs, and of the sidecar itself.
GUARDED = (
    "/etc/postfix/",
    "/etc/dkim-sidecar/",
    "/etc/redis/",
    "/etc/rspamd/",
    "/etc/opendkim",
    "/etc/mailname",
    "/etc/aliases",
)
# Installed by the postfix package, not written by an admin: the list of directories and
# their modes that the Postfix harness creates for each instance (see harness/postfix.py).
ALLOWED = ("/etc/postfix/postfix-files",)


class HostStateError(RuntimeError):
    """A test opened host configuration that it did not create."""


def _is_guarded(path: str) -> bool:
    path = os.path.normpath(path)
    if path.startswith(ALLOWED):
        return False
    return any(path == g.rstrip("/") or path.startswith(g) for g in GUARDED)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not args:
        return
    path = args[0]
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if isinstance(path, str) and path.startswith("/etc/") and _is_guarded(path):
        raise HostStateError(
            f"a test opened {path}, host configuration it did not create; a fresh machine "
            "has none: write what the test needs under its own temp dir"
        )


_installed = False


def install() -> None:
    """Guard this process and every Postfix tool it starts (idempotent)."""
    global _installed
    os.environ["MAIL_CONFIG"] = NO_MAIL_CONFIG
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True
