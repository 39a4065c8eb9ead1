"""What the commands share: the config file they read, user errors, line ends, input
files and DNS records given on the command line."""

from __future__ import annotations

import argparse
import os
import re

from ..config import Config, load_config

DEFAULT_CONFIG = "/etc/dkim-sidecar/config.yml"


class UsageError(Exception):
    """A problem the user can fix; the text is the whole message."""


def to_crlf(data: bytes) -> bytes:
    """Any mix of LF and CRLF line ends as CRLF (the core takes CRLF only)."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def config_path(arg: str | None) -> str | None:
    """--config, else $DKIM_SIDECAR_CONFIG, else the default path if it exists, else None
    (the built-in defaults)."""
    if arg:
        return arg
    env = os.environ.get("DKIM_SIDECAR_CONFIG")
    if env:
        return env
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def load_config_of(arg: str | None) -> tuple[str | None, Config]:
    path = config_path(arg)
    return path, load_config(path)


def header_names(text: str) -> tuple[str, ...]:
    return tuple(n.strip().lower() for n in re.split(r"[:,\s]+", text) if n.strip())


def read_input(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def dns_records(args: argparse.Namespace) -> dict[bytes, bytes]:
    """--record NAME=TXT and --records FILE (lines NAME=TXT). A TXT that starts with a quote
    is taken as zone-file strings, `"v=DKIM1; k=rsa; " "p=MIIB..."`: each quoted string, joined
    (as DNS joins the strings of one record)."""
    items = list(args.record or [])
    if args.records:
        items += [line for line in read_input(args.records).decode().splitlines() if line.strip()]
    records: dict[bytes, bytes] = {}
    for item in items:
        name, eq, txt = item.partition("=")
        if not eq:
            raise UsageError(f"record {item!r}: expected NAME=TXT")
        txt = txt.strip()
        if txt.startswith('"'):
            txt = "".join(re.sub(r"\\(.)", r"\1", part) for part in _QUOTED.findall(txt))
        records[name.strip().rstrip(".").lower().encode()] = txt.encode()
    return records
