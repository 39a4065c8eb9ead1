"""The validated configuration model: YAML (plus environment overrides) → a frozen `Config`.

Two stages: a YAML document is parsed into plain Python data, then checked key by
key into frozen dataclasses and Enums. Unknown keys are errors, and every problem is collected
and reported together, one per line, each naming the file, the key path, the bad value and what
was expected::

    dkim-sidecar.yml: relay_networks[2]: "10.0.0.0/33" is not an IPv4/IPv6 network

A bad configuration never produces a traceback: `load_config` and `parse_config` raise
`ConfigError`, whose str() is those lines joined by newlines.

Secrets never live in the model: the Redis password comes from an environment variable or a file
when the key source is made (at start and at each SIGHUP); the model keeps the variable NAME and
the file PATH only.

This module does no network or key I/O and checks no paths on disk: key sources report missing
files themselves when they load.
"""

from __future__ import annotations

import difflib
import enum
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import (
    IPv4Network,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any, TypeVar

import yaml

from dkim_sidecar.dkim.canon import Canon, Canonicalization
from dkim_sidecar.dkim.names import BadName, dns_name
from dkim_sidecar.keysources.specs import (
    DEFAULT_KEY_DIRECTORY,
    DirectorySource,
    KeySource,
    RedisSource,
    TableEntry,
    TableSource,
)
from dkim_sidecar.milter.address import HTTP_FORMS, MILTER_FORMS, Listen, ListenKind, is_host_name

__all__ = [
    "DEFAULT_KEY_DIRECTORY",
    "DEFAULT_OVERSIGN_HEADERS",
    "DEFAULT_SIGN_HEADERS",
    "ENV_KEYS_DIRECTORY",
    "ENV_LISTEN",
    "ENV_LOG_FORMAT",
    "ENV_LOG_LEVEL",
    "ENV_METRICS_LISTEN",
    "ENV_REDIS_HOST",
    "ENV_RELAY_NETWORKS",
    "Config",
    "ConfigError",
    "DirectorySource",
    "DomainFrom",
    "KeySource",
    "KeysConfig",
    "Limits",
    "LogFormat",
    "LogLevel",
    "LongLines",
    "MailcowNetworks",
    "MetricsConfig",
    "OnError",
    "RedisSource",
    "TableEntry",
    "TableSource",
    "is_forbidden_sign_header",
    "keep_restart_settings",
    "load_config",
    "packet_limit",
    "parse_config",
    "parse_domain",
    "parse_selector",
]

IPNetwork = IPv4Network | IPv6Network

# --- errors ------------------------------------------------------------------------------------


class ConfigError(Exception):
    """The configuration is unusable. `problems` holds one line per problem found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


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


# --- enums -------------------------------------------------------------------------------------


class DomainFrom(enum.StrEnum):
    """Where the signing domain (d=) comes from."""

    HEADER = "header"  # the From header: DMARC-aligned
    ENVELOPE = "envelope"  # MAIL FROM


class OnError(enum.StrEnum):
    """What to answer Postfix when signing fails."""

    ACCEPT = "accept"  # deliver unsigned
    TEMPFAIL = "tempfail"  # 4xx: the client retries later


class LongLines(enum.StrEnum):
    """Bodies with lines over 998 octets: Postfix folds them after every milter, breaking any
    signature, so by default such messages are left unsigned."""

    SKIP = "skip"
    SIGN = "sign"


class MailcowNetworks(enum.StrEnum):
    """Which of Mailcow's forwarding hosts (Redis `WHITELISTED_FWD_HOST`) count as relays."""

    KEEP_SPAM = "keep_spam"  # only those with the spam filter disabled (`KEEP_SPAM`)
    FORWARDING_HOSTS = "forwarding_hosts"  # all of them


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def level(self) -> int:
        """The `logging` module's number for this level."""
        return {
            LogLevel.DEBUG: logging.DEBUG,
            LogLevel.INFO: logging.INFO,
            LogLevel.WARNING: logging.WARNING,
            LogLevel.ERROR: logging.ERROR,
        }[self]


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


def is_forbidden_sign_header(name: str) -> bool:
    """Headers that Mailcow's `smtp_header_checks` rewrites or drops after all milters ran (and
    our own DKIM-Signature): signing them breaks the signature."""
    name = name.lower()
    return name in _FORBIDDEN_SIGN_HEADERS or name.startswith("x-forward")


_FORBIDDEN_SIGN_HEADERS = frozenset(
    {"received", "return-path", "x-originating-ip", "x-enigmail", "dkim-signature"}
)

# RFC 6376 §5.4.1's list, with Message-ID after the addressing fields, merged with the
# `sign_headers` that Mailcow sets for rspamd (data/conf/rspamd/local.d/dkim_signing.conf).
DEFAULT_SIGN_HEADERS: tuple[str, ...] = (
    "from",
    "reply-to",
    "subject",
    "date",
    "to",
    "cc",
    "message-id",
    "sender",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-language",
    "resent-date",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "resent-message-id",
    "in-reply-to",
    "references",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
    "disposition-notification-to",
    "disposition-notification-options",
    "original-recipient",
    "openpgp",
    "autocrypt",
)
DEFAULT_OVERSIGN_HEADERS: tuple[str, ...] = (
    "from",
    "to",
    "cc",
    "subject",
    "reply-to",
    "date",
    "message-id",
)

# --- listen addresses --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeysConfig:
    """Key sources in the order written in the YAML; for a domain, the first source that has
    keys for it wins."""

    sources: tuple[KeySource, ...] = (DirectorySource(),)
    refresh_interval: float = 60.0

    @property
    def redis(self) -> RedisSource | None:
        return next((s for s in self.sources if isinstance(s, RedisSource)), None)

    @property
    def directory(self) -> DirectorySource | None:
        return next((s for s in self.sources if isinstance(s, DirectorySource)), None)

    @property
    def table(self) -> TableSource | None:
        return next((s for s in self.sources if isinstance(s, TableSource)), None)


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 1_048_576
    max_headers: int = 1000


@dataclass(frozen=True)
class MetricsConfig:
    listen: Listen | None = Listen(ListenKind.INET, host="127.0.0.1", port=9901)
    per_domain_labels: bool = False


# --- the model ---------------------------------------------------------------------------------

_MAPPED_V4 = IPv6Network("::ffff:0:0/96")
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def mapped_ipv4(net: IPv6Network) -> IPv4Network | None:
    """The IPv4 network that an IPv4-mapped one (::ffff:a.b.c.d/n, n ≥ 96) stands for, else
    None. Postfix reports such a client as IPv4, and is_relay matches it so."""
    if not net.subnet_of(_MAPPED_V4):
        return None
    return IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))


_RELAXED_RELAXED = Canonicalization(Canon.RELAXED, Canon.RELAXED)


@dataclass(frozen=True)
class RelayTable:
    """Relay networks as (network, mask) integers per address family, built once per config
    or snapshot, so that the check at connect and MAIL parses nothing but the client address."""

    v4: tuple[tuple[int, int], ...]
    v6: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, networks: Iterable[IPNetwork]) -> RelayTable:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for net in networks:
            if isinstance(net, IPv4Network):
                v4.append((int(net.network_address), int(net.netmask)))
                continue
            v6.append((int(net.network_address), int(net.netmask)))
            mapped = mapped_ipv4(net)
            if mapped is not None:  # ::ffff:a.b.c.d/n also matches the IPv4 client a.b.c.d
                v4.append((int(mapped.network_address), int(mapped.netmask)))
        return cls(tuple(v4), tuple(v6))

    def contains(self, ip: str) -> bool:
        """Is this client address in one of the networks? An IPv4-mapped IPv6 address
        (::ffff:a.b.c.d) is matched as IPv4; anything that is not an address gives False."""
        # inet_pton is strict (dotted quad, RFC 4291 text) and ~20 times faster than ipaddress
        try:
            if ":" in ip:
                packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
                if packed[:12] == _MAPPED_PREFIX:
                    table, value = self.v4, int.from_bytes(packed[12:])
                else:
                    table, value = self.v6, int.from_bytes(packed)
            else:
                table, value = self.v4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip))
        except (OSError, TypeError, ValueError):
            return False
        return any(value & mask == net for net, mask in table)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration. `Config()` is the built-in default."""

    listen: Listen = Listen(ListenKind.INET, host="127.0.0.1", port=8891)
    relay_networks: tuple[IPNetwork, ...] = (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))
    sign_authenticated: bool = False
    domain_from: DomainFrom = DomainFrom.HEADER
    parent_domain_fallback: bool = False
    on_error: OnError = OnError.ACCEPT
    canonicalization: Canonicalization = _RELAXED_RELAXED
    sign_headers: tuple[str, ...] = DEFAULT_SIGN_HEADERS
    oversign_headers: tuple[str, ...] = DEFAULT_OVERSIGN_HEADERS
    expire_after: int | None = None
    long_lines: LongLines = LongLines.SKIP
    limits: Limits = Limits()
    keys: KeysConfig = KeysConfig()
    relay_networks_from_mailcow: MailcowNetworks | None = None
    # the MTAs that may connect (networks, and host names resolved at run time); None: anyone
    mta_peers: tuple[IPNetwork | str, ...] | None = None
    metrics: MetricsConfig = MetricsConfig()
    log_format: LogFormat = LogFormat.TEXT
    log_level: LogLevel = LogLevel.INFO
    source: str = "<defaults>"

    _relay: RelayTable = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_relay", RelayTable.of(self.relay_networks))

    def is_relay(self, ip: str) -> bool:
        """Is this client address in a relay network (RelayTable.contains)?"""
        return self._relay.contains(ip)


def packet_limit(config: Config) -> int:
    """The largest milter packet the server takes. A header field comes in one packet
    (Postfix: up to header_size_limit, 100 KB by default): the configured header cap and more,
    but not without bound. Fixed when the server starts."""
    return max(config.limits.max_header_bytes, 1 << 20) + 65536


def keep_restart_settings(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The one list of what a reload cannot change: `new` with those settings as `old` has
    them, and the names of the ones that differ (they need a restart)."""
    changed: list[str] = []
    listen, metrics_listen, limits = new.listen, new.metrics.listen, new.limits
    if old.listen != new.listen:
        changed.append("listen")
        listen = old.listen
    if old.metrics.listen != new.metrics.listen:
        changed.append("metrics.listen")
        metrics_listen = old.metrics.listen
    if packet_limit(new) > packet_limit(old):
        # the server would end the connection at a header field the session may now keep
        changed.append("limits.max_header_bytes")
        limits = replace(new.limits, max_header_bytes=old.limits.max_header_bytes)
    kept = replace(
        new, listen=listen, metrics=replace(new.metrics, listen=metrics_listen), limits=limits
    )
    return kept, changed


# --- loading -----------------------------------------------------------------------------------

ENV_LISTEN = "DKIM_SIDECAR_LISTEN"
ENV_RELAY_NETWORKS = "DKIM_SIDECAR_RELAY_NETWORKS"
ENV_METRICS_LISTEN = "DKIM_SIDECAR_METRICS_LISTEN"
ENV_LOG_LEVEL = "DKIM_SIDECAR_LOG_LEVEL"
ENV_LOG_FORMAT = "DKIM_SIDECAR_LOG_FORMAT"
ENV_REDIS_HOST = "DKIM_SIDECAR_REDIS_HOST"
ENV_KEYS_DIRECTORY = "DKIM_SIDECAR_KEYS_DIRECTORY"


def load_config(path: str | None, env: Mapping[str, str] = os.environ) -> Config:
    """Read and validate a YAML config file, then apply environment overrides.

    `path` None gives the built-in defaults (plus environment overrides). Raises ConfigError.
    """
    if path is None:
        return parse_config({}, "<defaults>", env)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte offset {e.start})"]) from None
    problems: list[str] = []
    data = _load_yaml(text, path, problems)
    if problems and data is None:
        raise ConfigError(problems)
    try:
        config = parse_config(data, path, env)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    if problems:
        raise ConfigError(problems)
    return config


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also records duplicate keys (plain YAML keeps the last silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    self.duplicates.append((key_node.value, key_node.start_mark.line + 1))
                seen.add(ident)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str, problems: list[str]) -> object:
    """Parse YAML safely; syntax errors and duplicate keys go to `problems` with their line."""
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        problems.append(f"{where}: YAML syntax error: {what or e}")
        return None
    except yaml.YAMLError as e:
        problems.append(f"{source}: YAML error: {e}")
        return None
    finally:
        loader.dispose()
    for key, line in loader.duplicates:
        problems.append(f"{source}: line {line}: duplicate key {_show(key)} (only one may be set)")
    return data


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


# --- sections ----------------------------------------------------------------------------------


def _limits(at: _At, value: object) -> Limits | None:
    data = _section(
        at,
        value,
        {"max_header_bytes": _field(_positive_int), "max_headers": _field(_positive_int)},
    )
    return None if data is None else Limits(**data)


def _metrics(at: _At, value: object) -> MetricsConfig | None:
    data = _section(at, value, {"listen": _field(_http_listen), "per_domain_labels": _field(_bool)})
    return None if data is None else MetricsConfig(**data)


_TABLE_ENTRY: dict[str, Parser] = {
    "domain": _field(_domain),
    "selector": _field(_selector),
    "key_file": _field(_abs_path),
}


def _table(at: _At, value: object) -> TableSource | None:
    items = _list(at, value, "mappings with domain, selector and key_file")
    if items is None:
        return None
    entries: list[TableEntry] = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(items):
        at_i = at.index(i)
        data = _section(at_i, item, _TABLE_ENTRY)
        if data is None:
            continue
        for key in _TABLE_ENTRY:
            if key not in data:
                at_i.key(key).error("missing (each entry needs domain, selector and key_file)")
        if any(data.get(key) is None for key in _TABLE_ENTRY):
            continue
        entry = TableEntry(**data)
        ident = (entry.domain, entry.selector.lower())
        if ident in seen:
            at_i.error(f"{_show(f'{entry.selector}.{entry.domain}')} is listed twice")
        seen.add(ident)
        entries.append(entry)
    return TableSource(tuple(entries))


_REDIS: dict[str, Parser] = {
    "host": _field(_host),
    "port": _field(_port),
    "db": _field(_nonneg_int),
    "username": _field(_optional(_acl_user)),
    "password_env": _field(_optional(_env_name)),
    "password_file": _field(_optional(_abs_path)),
    "selectors_hash": _field(_hash_name),
    "keys_hash": _field(_hash_name),
    "pub_keys_hash": _field(_hash_name),
    "ed25519_key_prefix": _field(_optional(_hash_name)),
    "timeout": _field(_positive_seconds),
}


def _redis(at: _At, value: object) -> RedisSource | None:
    # `redis:` with nothing after it (null) means every default
    data = _section(at, {} if value is None else value, _REDIS)
    if data is None:
        return None
    source = RedisSource(**data)
    # e.g. selectors_hash: DKIM_PRIV_KEYS would read keys where names belong
    seen: dict[str, str] = {}
    for key in ("selectors_hash", "keys_hash", "pub_keys_hash"):
        name = getattr(source, key)
        if name in seen:
            at.key(key).error(f"{_show(name)} is already {seen[name]}; the three must differ")
        seen.setdefault(name, key)
    rsa_hashes = {source.selectors_hash, source.keys_hash, source.pub_keys_hash}
    ed_hashes = {source.ed25519_selectors_hash, source.ed25519_keys_hash}
    clash = sorted(h for h in rsa_hashes & ed_hashes if h)
    if clash:
        at.key("ed25519_key_prefix").error(
            f"{_show(source.ed25519_key_prefix)} makes the Ed25519 hash "
            f"{clash[0]} the same as an RSA hash (choose e.g. DKIM_ED25519_)"
        )
    return source


def _directory(at: _At, value: object) -> DirectorySource | None:
    path = _convert(at, value, _abs_path)
    return None if path is None else DirectorySource(path)


_KEYS: dict[str, Parser] = {
    "directory": _directory,
    "table": _table,
    "redis": _redis,
    "refresh_interval": _field(_positive_seconds),
}
_SOURCE_KEYS = ("directory", "table", "redis")


def _keys(at: _At, value: object) -> KeysConfig | None:
    """None when the section had a problem (so that no check builds on a half-read section)."""
    before = len(at.problems)
    data = _section(at, value, _KEYS)
    if data is None:
        return None
    # the sources in the order the file lists them (yaml keeps mapping order)
    sources = tuple(v for k, v in data.items() if k in _SOURCE_KEYS and v is not None)
    if not any(k in _SOURCE_KEYS for k in data):
        at.error("no key source configured (expected directory, table and/or redis)")
    if len(at.problems) > before:
        return None
    if "refresh_interval" in data:
        return KeysConfig(sources=sources, refresh_interval=data["refresh_interval"])
    return KeysConfig(sources=sources)


_TOP: dict[str, Parser] = {
    "listen": _field(_milter_listen),
    "relay_networks": _networks,
    "sign_authenticated": _field(_bool),
    "domain_from": _field(_choice(DomainFrom)),
    "parent_domain_fallback": _field(_bool),
    "on_error": _field(_choice(OnError)),
    "canonicalization": _field(_canonicalization),
    "sign_headers": _sign_headers,
    "oversign_headers": _header_names,
    "expire_after": _field(_optional(_positive_int)),
    "long_lines": _field(_choice(LongLines)),
    "limits": _limits,
    "keys": _keys,
    "relay_networks_from_mailcow": _field(_optional(_choice(MailcowNetworks))),
    "mta_peers": _peers,
    "metrics": _metrics,
    "log_format": _field(_choice(LogFormat)),
    "log_level": _field(_choice(LogLevel)),
}


def parse_config(data: object, source: str, env: Mapping[str, str] = os.environ) -> Config:
    """Validate already-parsed YAML data (`source` names it in messages), then apply the
    environment overrides from `env`. Raises ConfigError listing every problem."""
    problems: list[str] = []
    at = _At(problems, source)
    values = _section(at, {} if data is None else data, _TOP)  # None: an empty file
    if values is None:
        raise ConfigError(problems)
    d = Config()

    sign_headers = values.get("sign_headers", d.sign_headers) or ()
    if "oversign_headers" in values:
        unsigned = [n for n in values["oversign_headers"] or () if n not in sign_headers]
        if unsigned and sign_headers:
            at.key("oversign_headers").error(
                f"{_show(unsigned)} not in sign_headers (only signed headers can be oversigned)"
            )
    else:  # the default list, cut down to the headers that are signed
        values["oversign_headers"] = tuple(n for n in d.oversign_headers if n in sign_headers)

    mailcow = values.get("relay_networks_from_mailcow")
    keys: KeysConfig | None = values.get("keys", d.keys)
    if mailcow is not None and keys is not None and keys.redis is None:
        at.key("relay_networks_from_mailcow").error(
            f"{_show(mailcow.value)} needs a keys.redis source, and none is configured"
        )

    _apply_env(values, env, problems)
    if problems:
        raise ConfigError(problems)
    return Config(**values, source=source)


def _apply_env(values: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> None:
    """Apply the DKIM_SIDECAR_* overrides to the parsed values. An empty variable counts as
    unset, except DKIM_SIDECAR_METRICS_LISTEN where empty (or `off`) disables the endpoint."""
    d = Config()

    def var(name: str) -> tuple[_At, str] | None:
        value = env.get(name)
        if value is None or (not value.strip() and name != ENV_METRICS_LISTEN):
            return None
        return _At(problems, f"env {name}"), value.strip()

    if got := var(ENV_LISTEN):
        values["listen"] = _convert(*got, _milter_listen)
    if got := var(ENV_RELAY_NETWORKS):
        at, text = got
        networks = [_convert(at, x, _network) for x in re.split(r"[\s,]+", text) if x]
        values["relay_networks"] = tuple(n for n in networks if n is not None)
    if got := var(ENV_METRICS_LISTEN):
        at, text = got
        listen = None if text.lower() in ("", "off") else _convert(at, text, _http_listen)
        metrics: MetricsConfig | None = values.get("metrics", d.metrics)
        if metrics is not None:
            values["metrics"] = replace(metrics, listen=listen)
    if got := var(ENV_LOG_LEVEL):
        values["log_level"] = _convert(*got, _choice(LogLevel))
    if got := var(ENV_LOG_FORMAT):
        values["log_format"] = _convert(*got, _choice(LogFormat))

    keys: KeysConfig | None = values.get("keys", d.keys)
    if keys is None:
        return  # a problem in the file's keys section was reported
    sources = list(keys.sources)
    if got := var(ENV_REDIS_HOST):
        at, text = got
        redis = keys.redis
        if redis is None:
            at.error(f"{_show(text)} is set, but no keys.redis source is configured")
        elif (host := _convert(at, text, _host)) is not None:
            sources[sources.index(redis)] = replace(redis, host=host)
    if got := var(ENV_KEYS_DIRECTORY):
        at, text = got
        directory = keys.directory
        if directory is None:
            at.error(f"{_show(text)} is set, but no keys.directory source is configured")
        elif (path := _convert(at, text, _abs_path)) is not None:
            sources[sources.index(directory)] = DirectorySource(path)
    if tuple(sources) != keys.sources:
        values["keys"] = replace(keys, sources=tuple(sources))
