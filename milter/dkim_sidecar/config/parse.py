"""A parsed YAML document (plain Python data) checked key by key into a Config, every problem
collected; then the DKIM_SIDECAR_* environment overrides."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..keysources.specs import DirectorySource, RedisSource, TableEntry, TableSource
from .convert import (
    Parser,
    _abs_path,
    _acl_user,
    _At,
    _bool,
    _canonicalization,
    _choice,
    _convert,
    _domain,
    _env_name,
    _field,
    _hash_name,
    _header_names,
    _host,
    _http_listen,
    _list,
    _milter_listen,
    _network,
    _networks,
    _nonneg_int,
    _optional,
    _peers,
    _port,
    _positive_int,
    _positive_seconds,
    _section,
    _selector,
    _show,
    _sign_headers,
)
from .model import (
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
)

ENV_LISTEN = "DKIM_SIDECAR_LISTEN"
ENV_RELAY_NETWORKS = "DKIM_SIDECAR_RELAY_NETWORKS"
ENV_METRICS_LISTEN = "DKIM_SIDECAR_METRICS_LISTEN"
ENV_LOG_LEVEL = "DKIM_SIDECAR_LOG_LEVEL"
ENV_LOG_FORMAT = "DKIM_SIDECAR_LOG_FORMAT"
ENV_REDIS_HOST = "DKIM_SIDECAR_REDIS_HOST"
ENV_KEYS_DIRECTORY = "DKIM_SIDECAR_KEYS_DIRECTORY"


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
