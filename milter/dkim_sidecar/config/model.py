"""The configuration model: frozen dataclasses and enums, the built-in defaults, and what a
reload cannot change. Nothing here reads a file or checks a value: parse.py does that."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network

from ..dkim.canon import Canon, Canonicalization
from ..keysources.specs import DirectorySource, KeySource, RedisSource, TableSource
from ..milter.address import Listen, ListenKind
from ..relay import IPNetwork


class ConfigError(Exception):
    """The configuration is unusable. `problems` holds one line per problem found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


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

_RELAXED_RELAXED = Canonicalization(Canon.RELAXED, Canon.RELAXED)


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


def packet_limit(config: Config) -> int:
    """The largest milter packet the server takes. A header field comes in one packet
    (Postfix: up to header_size_limit, 100 KB by default): the configured header cap and more,
    but not without bound. Fixed when the server starts."""
    return max(config.limits.max_header_bytes, 1 << 20) + 65536


def keep_restart_settings(
    old: Config, new: Config, server_packet_limit: int | None = None
) -> tuple[Config, list[str]]:
    """The one list of what a reload cannot change: `new` with those settings as `old` has
    them, and the names of the ones that differ (they need a restart). The header cap may
    change up to the packet limit the server took at start (`server_packet_limit`; by default
    the one `old` gives)."""
    changed: list[str] = []
    listen, metrics_listen, limits = new.listen, new.metrics.listen, new.limits
    if old.listen != new.listen:
        changed.append("listen")
        listen = old.listen
    if old.metrics.listen != new.metrics.listen:
        changed.append("metrics.listen")
        metrics_listen = old.metrics.listen
    limit = packet_limit(old) if server_packet_limit is None else server_packet_limit
    if packet_limit(new) > limit:
        # the server would end the connection at a header field the session may now keep
        changed.append("limits.max_header_bytes")
        limits = replace(new.limits, max_header_bytes=old.limits.max_header_bytes)
    kept = replace(
        new, listen=listen, metrics=replace(new.metrics, listen=metrics_listen), limits=limits
    )
    return kept, changed
