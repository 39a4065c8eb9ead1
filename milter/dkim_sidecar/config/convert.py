"""Turning one YAML value into a typed value, or a message that names it and says what was
expected; and the path of each value (file, key path) for those messages."""

from __future__ import annotations

import difflib
import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from typing import Any, TypeVar

from ..dkim.canon import Canonicalization
from ..dkim.names import BadName, dns_name
from ..milter.address import HTTP_FORMS, MILTER_FORMS, Listen, is_host_name
from ..relay import IPNetwork
from .model import is_forbidden_sign_header


class _Invalid(Exception):
    """Raised by a value converter; the message names the bad value and what was expected."""


def _show(value: object) -> str:
    """A short, safe rendering of a config value for an error message (YAML spelling)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = json.dumps(str(value), ensure_ascii=False)
    if len(text) > 80:
        text = text[:77] + "..."
    return text


@dataclass(frozen=True)
class _At:
    """Where a value came from: a file and key path, or an environment variable."""

    problems: list[str]
    origin: str  # "dkim-sidecar.yml" or "env DKIM_SIDECAR_LISTEN"
    path: str = ""

    def key(self, name: object) -> _At:
        label = name if isinstance(name, str) else _show(name)
        return _At(self.problems, self.origin, f"{self.path}.{label}" if self.path else label)

    def index(self, i: int) -> _At:
        return _At(self.problems, self.origin, f"{self.path}[{i}]")

    def error(self, message: str) -> None:
        where = f"{self.origin}: {self.path}" if self.path else self.origin
        self.problems.append(f"{where}: {message}")


# --- names -------------------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 §3.6.8 ftext
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_domain(text: str) -> str:
    """A signing domain (d=) by the one rule of dkim/names.py: lowercased, as A-labels.

    Raises ValueError with a message that names the value.
    """
    try:
        return dns_name(text, "domain")
    except BadName as e:
        raise ValueError(f"{_show(text)} is not a domain name ({e})") from None


def parse_selector(text: str) -> str:
    """A DKIM selector (s=) by the one rule of dkim/names.py. Raises ValueError."""
    try:
        return dns_name(text, "selector")
    except BadName as e:
        raise ValueError(f"{_show(text)} is not a DKIM selector ({e})") from None


# --- value converters: value → typed value, or raise _Invalid ------------------------------------

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"{_show(value)} is not true or false")


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise _Invalid(f"{_show(value)} is not a positive whole number")


def _positive_seconds(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise _Invalid(f"{_show(value)} is not a positive number of seconds")


def _port(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise _Invalid(f"{_show(value)} is not a TCP port (1-65535)")


def _nonneg_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _Invalid(f"{_show(value)} is not a whole number >= 0")


def _hash_name(value: object) -> str:
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    raise _Invalid(f"{_show(value)} is not a Redis key name (non-empty, no spaces)")


def _acl_user(value: object) -> str:
    # Redis takes any octets but spaces in an ACL user name (ACL SETUSER); a control character
    # or a space here is a paste error, and would be sent as is in AUTH
    if (
        isinstance(value, str)
        and 0 < len(value) <= 256
        and value.isprintable()
        and not any(c.isspace() for c in value)
    ):
        return value
    raise _Invalid(f"{_show(value)} is not a Redis ACL user name (non-empty, no spaces)")


def _abs_path(value: object) -> str:
    if isinstance(value, str) and value.startswith("/") and "\0" not in value:
        return value
    raise _Invalid(f"{_show(value)} is not an absolute path")


def _env_name(value: object) -> str:
    if isinstance(value, str) and _ENV_NAME.match(value):
        return value
    raise _Invalid(f"{_show(value)} is not an environment variable name")


def _host(value: object) -> str:
    if isinstance(value, str):
        try:
            return str(ip_address(value))
        except ValueError:
            if is_host_name(value):
                return value
    raise _Invalid(f"{_show(value)} is not a host name or IP address")


def _optional(conv: Callable[[object], T]) -> Callable[[object], T | None]:
    def convert(value: object) -> T | None:
        return None if value is None else conv(value)

    return convert


def _choice(kind: type[E]) -> Callable[[object], E]:
    names = ", ".join(str(m.value) for m in kind)

    def convert(value: object) -> E:
        if isinstance(value, str):
            for member in kind:
                if member.value == value.strip().lower():
                    return member
        raise _Invalid(f"{_show(value)} is not one of: {names}")

    return convert


def _milter_listen(value: object) -> Listen:
    if not isinstance(value, str):
        raise _Invalid(f"{_show(value)} is not a listen address (expected {MILTER_FORMS})")
    try:
        return Listen.parse(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _http_listen(value: object) -> Listen | None:
    if value is None or value is False:  # YAML `off`/`false` is a boolean: also "disabled"
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{_show(value)} is not a listen address (expected {HTTP_FORMS} or null)")
    try:
        return Listen.parse(value, allow_unix=False)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _canonicalization(value: object) -> Canonicalization:
    if isinstance(value, str):
        try:
            return Canonicalization.parse(value)
        except ValueError:
            pass
    raise _Invalid(
        f"{_show(value)} is not a canonicalization "
        "(expected header/body, each simple or relaxed, e.g. relaxed/relaxed)"
    )


def _network(value: object) -> IPNetwork:
    if isinstance(value, str):
        text = value.strip()
        try:
            return ip_network(text)
        except ValueError:
            try:
                loose = ip_network(text, strict=False)
            except ValueError:
                pass
            else:
                raise _Invalid(
                    f"{_show(value)} has host bits set (did you mean {loose}?)"
                ) from None
    raise _Invalid(f"{_show(value)} is not an IPv4/IPv6 network")


def _domain(value: object) -> str:
    if isinstance(value, str):
        try:
            return parse_domain(value)
        except ValueError as e:
            raise _Invalid(str(e)) from None
    raise _Invalid(f"{_show(value)} is not a domain name")


def _selector(value: object) -> str:
    if isinstance(value, str):
        try:
            return parse_selector(value)
        except ValueError as e:
            raise _Invalid(str(e)) from None
    raise _Invalid(f"{_show(value)} is not a DKIM selector")


# --- structural helpers --------------------------------------------------------------------------
#
# A parser takes (where, raw value) and returns the typed value; on a problem it reports it and
# returns None. Sections are read in the order their keys appear in the file, so that problems
# are reported in file order. No model object is built from a section that had problems.

Parser = Callable[[_At, object], Any]


def _field(conv: Callable[[object], T]) -> Callable[[_At, object], T | None]:
    """A parser from a value converter."""

    def parse(at: _At, value: object) -> T | None:
        try:
            return conv(value)
        except _Invalid as e:
            at.error(str(e))
            return None

    return parse


def _convert(at: _At, value: object, conv: Callable[[object], T]) -> T | None:
    return _field(conv)(at, value)


def _section(at: _At, value: object, parsers: Mapping[str, Parser]) -> dict[str, Any] | None:
    """Read a mapping key by key in file order; unknown keys are reported (with a suggestion).

    Returns the parsed values of the keys present, or None (reported) if `value` is no mapping.
    """
    allowed = list(parsers)
    if not isinstance(value, dict):
        at.error(f"{_show(value)} is not a mapping (expected keys: {', '.join(allowed)})")
        return None
    result: dict[str, Any] = {}
    for key, raw in value.items():
        parser = parsers.get(key) if isinstance(key, str) else None
        if parser is None:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = (
                f"did you mean {close[0]}?" if close else f"expected one of: {', '.join(allowed)}"
            )
            at.key(key).error(f"unknown key ({hint})")
            continue
        result[key] = parser(at.key(key), raw)
    return result


def _list(at: _At, value: object, what: str) -> list[Any] | None:
    if isinstance(value, list):
        return value
    at.error(f"{_show(value)} is not a list of {what}")
    return None


def _networks(at: _At, value: object) -> tuple[IPNetwork, ...] | None:
    items = _list(at, value, "networks (e.g. [192.168.1.0/24, 10.0.0.5])")
    if items is None:
        return None
    result = [_convert(at.index(i), item, _network) for i, item in enumerate(items)]
    return tuple(n for n in result if n is not None)


def _peer(value: object) -> IPNetwork | str:
    """An MTA peer: an address or network (as in relay_networks), or a host name."""
    try:
        return _network(value)
    except _Invalid as exc:
        if "host bits" in str(exc):
            raise
    try:
        host = _host(value)
        if host.rpartition(".")[2].isdigit():  # RFC 3696 §2: no all-numeric top label
            raise _Invalid(host)
    except _Invalid:
        raise _Invalid(
            f"{_show(value)} is not an IP address, network or host name (e.g. postfix-mailcow, "
            "172.22.1.253, 10.0.0.0/24)"
        ) from None
    return host.lower()


def _peers(at: _At, value: object) -> tuple[IPNetwork | str, ...] | None:
    if value is None:
        return None  # unset: any peer (a warning says so where it matters)
    items = _list(at, value, "addresses, networks or host names (e.g. [postfix-mailcow])")
    if items is None:
        return None
    if not items:
        at.error("is empty: no MTA could connect (leave it unset to allow any peer)")
        return None
    result = [_convert(at.index(i), item, _peer) for i, item in enumerate(items)]
    return tuple(dict.fromkeys(p for p in result if p is not None))


def _header_names(at: _At, value: object) -> tuple[str, ...] | None:
    """Lowercased, duplicates dropped, order kept; None (reported) when not a list."""
    items = _list(at, value, "header names")
    if items is None:
        return None
    result: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not _HEADER_NAME.match(item):
            at.index(i).error(f"{_show(item)} is not a header field name")
            continue
        name = item.lower()
        if name not in result:
            result.append(name)
    return tuple(result)


def _sign_headers(at: _At, value: object) -> tuple[str, ...] | None:
    names = _header_names(at, value)
    if names is None:
        return None
    forbidden = [n for n in names if is_forbidden_sign_header(n)]
    if forbidden:
        at.error(
            f"{_show(forbidden)} must not be signed: Mailcow rewrites or removes "
            "Received, Return-Path, X-Originating-IP, X-Enigmail and X-Forward* after all "
            "milters, and DKIM-Signature is added by signers"
        )
    if "from" not in names:
        at.error(f"{_show(list(names))} lacks from (RFC 6376 §5.4: From MUST be signed)")
    return names
