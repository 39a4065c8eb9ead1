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

from ..keysources.specs import (
    DEFAULT_KEY_DIRECTORY,
    DirectorySource,
    KeySource,
    RedisSource,
    TableEntry,
    TableSource,
)
from ..relay import IPNetwork
from .convert import parse_domain, parse_selector
from .load import load_config
from .model import (
    DEFAULT_OVERSIGN_HEADERS,
    DEFAULT_SIGN_HEADERS,
    Config,
    ConfigError,
    DomainFrom,
    KeysConfig,
    Limits,
    LogFormat,
    LogLevel,
    LongLines,
    MailcowNetworks,
    MetricsConfig,
    OnError,
    is_forbidden_sign_header,
    keep_restart_settings,
    packet_limit,
)
from .parse import (
    ENV_KEYS_DIRECTORY,
    ENV_LISTEN,
    ENV_LOG_FORMAT,
    ENV_LOG_LEVEL,
    ENV_METRICS_LISTEN,
    ENV_REDIS_HOST,
    ENV_RELAY_NETWORKS,
    parse_config,
)

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
    "IPNetwork",
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
