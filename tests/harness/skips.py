"""A skip must not hide a regression.

`make test` installs every part the suite drives (Postfix, Redis, rspamd, the Docker engine,
debootstrap, a C compiler...). When one of them is missing or does not start, the tests that
need it would skip and the run would still be green, with the image, the Mailcow chain or the
Postfix oracle unchecked. So, in strict mode, a skip is a failure unless it is for something the
machine truly cannot have (a CPU feature, IPv6 on loopback, a kernel facility): those skips go
through `machine_cannot`, and say so.

Strict mode is on under `make test` (``--no-skips``) and whenever ``CI`` is set to a true value,
as CI services do. Every run ends with the list of what was skipped and why, strict or not.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["MACHINE", "is_machine_limit", "machine_cannot", "strict_from_env"]

# The prefix of every skip reason that strict mode lets through.
MACHINE = "this machine cannot: "


def machine_cannot(reason: str) -> NoReturn:
    """Skip for something the machine cannot have, whatever is installed (never for a part
    `make test` installs: use pytest.skip or, better, fail)."""
    pytest.skip(MACHINE + reason)


def is_machine_limit(reason: str) -> bool:
    return reason.startswith(MACHINE)


def strict_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """CI services set CI=true (GitHub Actions, GitLab, Woodpecker...); a run there is strict."""
    return environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")
