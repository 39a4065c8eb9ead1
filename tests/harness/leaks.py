"""Secrets the suite handed to dkim-sidecar, and everything dkim-sidecar wrote: at the end of
the run (conftest.py) no secret may stand in any of it.

Registered automatically: every key PEM written by `sidecar.write_keys` or seeded into Redis
by `redis.seed_mailcow`, every Redis server password, every `*PASS*` variable given to a
sidecar. Scanned: every sidecar's log (exception texts included) and the /metrics, /readyz
and /healthz answers saved when it stopped.
"""

from __future__ import annotations

from pathlib import Path

SECRETS: set[str] = set()
OUTPUTS: list[Path] = []


def secret(value: str) -> None:
    if len(value) >= 8:  # shorter strings would match by chance
        SECRETS.add(value)


def secret_pem(pem: bytes) -> None:
    """Every line of the key's base64 body (a leak of any part of the key counts)."""
    for line in pem.decode("ascii", "replace").splitlines():
        line = line.strip()
        if line and not line.startswith("-----") and ":" not in line and len(line) >= 16:
            SECRETS.add(line)


def output(path: Path) -> None:
    OUTPUTS.append(path)


def find_leaks() -> list[str]:
    found = []
    for path in OUTPUTS:
        if not path.exists():
            continue
        text = path.read_text(errors="replace")
        for s in SECRETS:
            if s in text:
                found.append(f"{path}: contains a secret ({s[:4]}...)")
    return found
