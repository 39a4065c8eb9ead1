"""Listen and connect addresses in the one spelling Postfix and the config use:
`inet:HOST:PORT`, `inet6:[ADDR]:PORT`, `unix:/absolute/path`. Parsed here only: the server,
the config, the MTA-side client and the container's health check all read them so."""

from __future__ import annotations

import enum
import json
import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

__all__ = ["HTTP_FORMS", "MILTER_FORMS", "Listen", "ListenKind", "is_host_name"]

_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def is_host_name(text: str) -> bool:
    """Dot-separated labels of letters, digits, hyphens and underscores; 253 octets at most."""
    return 0 < len(text) <= 253 and all(_HOST_LABEL.match(x) for x in text.split("."))


class ListenKind(enum.StrEnum):
    INET = "inet"
    INET6 = "inet6"
    UNIX = "unix"


MILTER_FORMS = "inet:HOST:PORT, inet6:[ADDR]:PORT or unix:/absolute/path"
HTTP_FORMS = "inet:HOST:PORT or inet6:[ADDR]:PORT"


@dataclass(frozen=True)
class Listen:
    """A socket to listen on: `inet:HOST:PORT`, `inet6:[ADDR]:PORT` or `unix:/path`."""

    kind: ListenKind
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str, *, allow_unix: bool = True) -> Listen:
        """Parse the config spelling; raises ValueError naming the value and the forms expected."""
        forms = MILTER_FORMS if allow_unix else HTTP_FORMS

        def bad(why: str = "") -> ValueError:
            detail = f": {why}" if why else ""
            return ValueError(
                f"{json.dumps(text)} is not a listen address{detail} (expected {forms})"
            )

        scheme, sep, rest = text.strip().partition(":")
        scheme = scheme.lower()
        if not sep:
            raise bad()
        if scheme == "unix":
            if not allow_unix:
                raise bad("a unix socket is not supported here")
            if not rest.startswith("/"):
                raise bad("a unix socket needs an absolute path")
            if len(rest.encode()) > 107 or "\0" in rest:
                raise bad("a unix socket path must be at most 107 bytes")
            return cls(ListenKind.UNIX, path=rest)
        if scheme not in ("inet", "inet6"):
            raise bad()
        host, sep, port_text = rest.rpartition(":")
        if not sep or not port_text.isdigit() or not port_text.isascii():
            raise bad("the port is missing")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise bad(f"port {port} is out of range 1-65535")
        if scheme == "inet6":
            if not (host.startswith("[") and host.endswith("]")):
                raise bad("inet6 needs the address in brackets")
            try:
                addr = IPv6Address(host[1:-1])
            except ValueError:
                raise bad(f"{host[1:-1]!r} is not an IPv6 address") from None
            return cls(ListenKind.INET6, host=str(addr), port=port)
        try:
            IPv4Address(host)
        except ValueError:
            if ":" in host or host.startswith("["):
                raise bad("an IPv6 address needs inet6:[ADDR]:PORT") from None
            if not is_host_name(host):
                raise bad(f"{host!r} is not a host name or IPv4 address") from None
        return cls(ListenKind.INET, host=host, port=port)

    def __str__(self) -> str:
        if self.kind is ListenKind.UNIX:
            return f"unix:{self.path}"
        if self.kind is ListenKind.INET6:
            return f"inet6:[{self.host}]:{self.port}"
        return f"inet:{self.host}:{self.port}"

    def connect_to(self) -> tuple[int, str | tuple[str, int]]:
        """(family, address) for socket.connect; a wildcard host means this machine's
        loopback (what a health check or a local client reaches)."""
        if self.kind is ListenKind.UNIX:
            assert self.path is not None
            return socket.AF_UNIX, self.path
        assert self.host is not None and self.port is not None
        if self.kind is ListenKind.INET6:
            return socket.AF_INET6, ("::1" if self.host == "::" else self.host, self.port)
        return socket.AF_INET, ("127.0.0.1" if self.host == "0.0.0.0" else self.host, self.port)
