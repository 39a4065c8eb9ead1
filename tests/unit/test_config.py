"""Tests for the validated configuration model (dkim_sidecar.config)."""

from __future__ import annotations

import dataclasses
import textwrap
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dkim_sidecar.config import (
    DEFAULT_OVERSIGN_HEADERS,
    DEFAULT_SIGN_HEADERS,
    Config,
    ConfigError,
    DirectorySource,
    DomainFrom,
    Limits,
    LogFormat,
    LogLevel,
    LongLines,
    MailcowNetworks,
    OnError,
    RedisSource,
    TableEntry,
    TableSource,
    keep_restart_settings,
    load_config,
    packet_limit,
    parse_config,
    parse_domain,
    parse_selector,
)
from dkim_sidecar.dkim.canon import Canon, Canonicalization
from dkim_sidecar.milter.address import Listen, ListenKind
from dkim_sidecar.relay import RelayTable
from harness.paths import REPO


def is_relay(config: Config, ip: str) -> bool:
    """What the runtime asks of a snapshot: is `ip` in the config's relay networks?"""
    return RelayTable.of(config.relay_networks).contains(ip)


EXAMPLE = REPO / "config" / "dkim-sidecar.example.yml"
_MAPPED = IPv6Network("::ffff:0:0/96")


def write(tmp_path: Path, text: str, name: str = "config.yml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def problems(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "config.yml", env or {})
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def one_problem(data: object, env: dict[str, str] | None = None) -> str:
    found = problems(data, env)
    assert len(found) == 1, found
    return found[0]


# --- defaults ----------------------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(None, {})
    assert config == Config()
    assert config.source == "<defaults>"
    assert config.listen == Listen(ListenKind.INET, host="127.0.0.1", port=8891)
    assert str(config.listen) == "inet:127.0.0.1:8891"
    assert config.relay_networks == (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))
    assert config.sign_authenticated is False
    assert config.domain_from is DomainFrom.HEADER
    assert config.parent_domain_fallback is False
    assert config.on_error is OnError.ACCEPT
    assert config.canonicalization == Canonicalization(Canon.RELAXED, Canon.RELAXED)
    assert config.sign_headers == DEFAULT_SIGN_HEADERS
    assert config.sign_headers[:7] == (
        "from",
        "reply-to",
        "subject",
        "date",
        "to",
        "cc",
        "message-id",
    )
    assert config.oversign_headers == DEFAULT_OVERSIGN_HEADERS
    assert config.expire_after is None
    assert config.long_lines is LongLines.SKIP
    assert config.limits == Limits(max_header_bytes=1048576, max_headers=1000)
    assert config.keys.sources == (DirectorySource("/etc/dkim-sidecar/keys"),)
    assert config.keys.refresh_interval == 60
    assert config.relay_networks_from_mailcow is None
    assert config.metrics.listen is not None
    assert str(config.metrics.listen) == "inet:127.0.0.1:9901"
    assert config.metrics.per_domain_labels is False
    assert config.log_format is LogFormat.TEXT
    assert config.log_level is LogLevel.INFO


def test_default_sign_headers_cover_rfc6376_and_mailcow() -> None:
    rfc6376_541 = [
        "from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from",
        "resent-to", "resent-cc", "in-reply-to", "references", "list-id", "list-help",
        "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
    ]  # fmt: skip
    # mailcow/mailcow-dockerized data/conf/rspamd/local.d/dkim_signing.conf, sign_headers
    mailcow = [
        "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
        "mime-version", "content-type", "content-transfer-encoding", "content-language",
        "resent-to", "resent-cc", "resent-from", "resent-sender", "resent-message-id",
        "in-reply-to", "references", "list-id", "list-help", "list-owner", "list-unsubscribe",
        "list-subscribe", "list-post", "list-unsubscribe-post", "disposition-notification-to",
        "disposition-notification-options", "original-recipient", "openpgp", "autocrypt",
    ]  # fmt: skip
    assert set(DEFAULT_SIGN_HEADERS) == set(rfc6376_541) | set(mailcow)
    assert len(set(DEFAULT_SIGN_HEADERS)) == len(DEFAULT_SIGN_HEADERS)
    assert set(DEFAULT_OVERSIGN_HEADERS) <= set(DEFAULT_SIGN_HEADERS)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing but a comment\n")
    config = load_config(path, {})
    assert config == dataclasses.replace(Config(), source=path)
    assert config.source == path


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log_level = LogLevel.DEBUG  # type: ignore[misc]


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listen: unix:/run/dkim-sidecar/milter.sock
        relay_networks: [192.168.1.0/24, 10.0.0.5, "2001:db8::/32"]
        sign_authenticated: true
        domain_from: envelope
        parent_domain_fallback: true
        on_error: tempfail
        canonicalization: simple/relaxed
        sign_headers: [From, Subject, subject, To, Date]
        oversign_headers: [FROM]
        expire_after: 604800
        long_lines: sign
        limits: {max_header_bytes: 65536, max_headers: 50}
        keys:
          table:
            - {domain: Example.COM., selector: s2024, key_file: /keys/a.pem}
            - {domain: bücher.example, selector: ed, key_file: /keys/b.pem}
          redis:
            host: 172.22.1.249
            password_env: null
            password_file: /run/secrets/redis
            ed25519_key_prefix: DKIM_ED25519_
            timeout: 0.5
          directory: /var/lib/keys
          refresh_interval: 300
        relay_networks_from_mailcow: keep_spam
        metrics: {listen: "inet6:[::]:9901", per_domain_labels: true}
        log_format: json
        log_level: debug
        """,
    )
    config = load_config(path, {})
    assert config.listen.kind is ListenKind.UNIX
    assert config.listen.path == "/run/dkim-sidecar/milter.sock"
    assert config.relay_networks == (
        IPv4Network("192.168.1.0/24"),
        IPv4Network("10.0.0.5/32"),
        IPv6Network("2001:db8::/32"),
    )
    assert config.sign_authenticated is True
    assert config.domain_from is DomainFrom.ENVELOPE
    assert config.parent_domain_fallback is True
    assert config.on_error is OnError.TEMPFAIL
    assert str(config.canonicalization) == "simple/relaxed"
    assert config.sign_headers == ("from", "subject", "to", "date")
    assert config.oversign_headers == ("from",)
    assert config.expire_after == 604800
    assert config.long_lines is LongLines.SIGN
    assert config.limits == Limits(65536, 50)
    # sources in the order written, first match per domain wins
    table, redis, directory = config.keys.sources
    assert table == TableSource(
        (
            TableEntry("example.com", "s2024", "/keys/a.pem"),
            TableEntry("xn--bcher-kva.example", "ed", "/keys/b.pem"),
        )
    )
    assert isinstance(redis, RedisSource)
    assert redis.host == "172.22.1.249"
    assert redis.port == 6379
    assert redis.password_env is None
    assert redis.password_file == "/run/secrets/redis"
    assert redis.ed25519_selectors_hash == "DKIM_ED25519_SELECTORS"
    assert redis.ed25519_keys_hash == "DKIM_ED25519_PRIV_KEYS"
    assert redis.timeout == 0.5
    assert directory == DirectorySource("/var/lib/keys")
    assert config.keys.redis is redis
    assert config.keys.directory is directory
    assert config.keys.table is table
    assert config.keys.refresh_interval == 300
    assert config.relay_networks_from_mailcow is MailcowNetworks.KEEP_SPAM
    assert config.metrics.listen == Listen(ListenKind.INET6, host="::", port=9901)
    assert config.metrics.per_domain_labels is True
    assert config.log_format is LogFormat.JSON
    assert config.log_level is LogLevel.DEBUG


def test_redis_with_no_settings_takes_defaults() -> None:
    config = parse_config({"keys": {"redis": None}}, "c.yml", {})
    assert config.keys.sources == (RedisSource(),)
    redis = RedisSource()
    assert (redis.host, redis.port, redis.db) == ("redis-mailcow", 6379, 0)
    assert (redis.selectors_hash, redis.keys_hash, redis.pub_keys_hash) == (
        "DKIM_SELECTORS",
        "DKIM_PRIV_KEYS",
        "DKIM_PUB_KEYS",
    )
    assert redis.password_env == "REDISPASS"
    assert redis.password_file is None
    assert redis.ed25519_key_prefix is None
    assert redis.ed25519_keys_hash is None
    assert redis.timeout == 2.0


# --- enums -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "enum_type"),
    [
        ("domain_from", DomainFrom),
        ("on_error", OnError),
        ("long_lines", LongLines),
        ("log_format", LogFormat),
        ("log_level", LogLevel),
        ("relay_networks_from_mailcow", MailcowNetworks),
    ],
)
def test_every_enum_value(key: str, enum_type: type[DomainFrom]) -> None:
    base: dict[str, object] = {"keys": {"redis": {}}}
    for member in enum_type:
        config = parse_config({**base, key: member.value}, "c.yml", {})
        assert getattr(config, key) is member
        # case does not matter
        upper = parse_config({**base, key: member.value.upper()}, "c.yml", {})
        assert getattr(upper, key) is member
    names = ", ".join(m.value for m in enum_type)
    message = one_problem({**base, key: "nonsense"})
    assert message == f'config.yml: {key}: "nonsense" is not one of: {names}'


def test_log_level_maps_to_logging() -> None:
    import logging

    assert LogLevel.DEBUG.level == logging.DEBUG
    assert LogLevel.ERROR.level == logging.ERROR


@pytest.mark.parametrize("text", ["relaxed/relaxed", "simple/simple", "relaxed/simple", "relaxed"])
def test_canonicalization(text: str) -> None:
    config = parse_config({"canonicalization": text}, "c.yml", {})
    assert config.canonicalization == Canonicalization.parse(text)


def test_bad_canonicalization() -> None:
    message = one_problem({"canonicalization": "loose/relaxed"})
    assert message.startswith('config.yml: canonicalization: "loose/relaxed" is not a canon')


# --- reporting ---------------------------------------------------------------------------------


def test_three_mistakes_are_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listen: inet:127.0.0.1:99999
        relay_networks:
          - 127.0.0.0/8
          - 192.168.1.0/24
          - 10.0.0.0/33
        on_error: bounce
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    found = info.value.problems
    assert len(found) == 3, found
    assert str(info.value).splitlines() == found
    listen, network, on_error = found
    assert listen.startswith(f'{path}: listen: "inet:127.0.0.1:99999" is not a listen address')
    assert "port 99999 is out of range" in listen
    assert network == f'{path}: relay_networks[2]: "10.0.0.0/33" is not an IPv4/IPv6 network'
    assert on_error == f'{path}: on_error: "bounce" is not one of: accept, tempfail'


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'listen: inet:127.0.0.1:8891\nrelay_networks: [10.0.0.0/8\nlog_level: "info\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    (message,) = info.value.problems
    assert message.startswith(f"{path}: line ")
    assert "YAML syntax error" in message


def test_yaml_syntax_error_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: inet:127.0.0.1:8891\nlog_level: info\n  bad: indent: here\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    (message,) = info.value.problems
    assert message.startswith(f"{path}: line 3, column ")


def test_duplicate_key_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "log_level: info\nlisten: inet:127.0.0.1:1\nlog_level: debug\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems == [
        f'{path}: line 3: duplicate key "log_level" (only one may be set)'
    ]


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("/nonexistent/dkim-sidecar.yml", {})
    (message,) = info.value.problems
    assert message.startswith("/nonexistent/dkim-sidecar.yml: cannot read: ")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- listen\n- relay_networks\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    (message,) = info.value.problems
    assert message.startswith(f'{path}: ["listen", "relay_networks"] is not a mapping')


def test_unknown_key_top_level() -> None:
    assert one_problem({"relay_network": ["10.0.0.0/8"]}) == (
        "config.yml: relay_network: unknown key (did you mean relay_networks?)"
    )
    message = one_problem({"zzz": 1})
    assert message.startswith("config.yml: zzz: unknown key (expected one of: listen, ")


def test_unknown_key_nested() -> None:
    assert one_problem({"keys": {"redis": {"hots": "redis"}}}) == (
        "config.yml: keys.redis.hots: unknown key (did you mean host?)"
    )
    assert one_problem({"limits": {"max_header": 5}}) == (
        "config.yml: limits.max_header: unknown key (did you mean max_headers?)"
    )
    assert one_problem(
        {"keys": {"table": [{"domain": "a.example", "selector": "s", "key_file": "/k", "x": 1}]}}
    ).startswith("config.yml: keys.table[0].x: unknown key")


def test_no_traceback_types() -> None:
    """Wrong types anywhere give problems, never an exception other than ConfigError."""
    data = {
        "listen": 8891,
        "relay_networks": "10.0.0.0/8",
        "sign_authenticated": "yes",
        "sign_headers": "from:to",
        "oversign_headers": None,
        "expire_after": -5,
        "limits": [1, 2],
        "keys": {"table": {"domain": "x"}, "redis": "redis-mailcow", "refresh_interval": 0},
        "metrics": {"listen": 9901, "per_domain_labels": 1},
        "log_level": 3,
        None: 1,
    }
    found = problems(data)
    assert len(found) == 14, found
    assert all(line.startswith("config.yml: ") for line in found)


# --- listen ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "host", "port", "path"),
    [
        ("inet:127.0.0.1:8891", ListenKind.INET, "127.0.0.1", 8891, None),
        ("inet:0.0.0.0:1", ListenKind.INET, "0.0.0.0", 1, None),
        ("inet:dkim-sidecar:8891", ListenKind.INET, "dkim-sidecar", 8891, None),
        ("inet6:[::1]:8891", ListenKind.INET6, "::1", 8891, None),
        ("inet6:[fd4d:6169:6c63:6f77::10]:65535", ListenKind.INET6, "fd4d:6169:6c63:6f77::10",
         65535, None),
        ("unix:/run/milter.sock", ListenKind.UNIX, None, None, "/run/milter.sock"),
    ],
)  # fmt: skip
def test_listen_forms(
    text: str, kind: ListenKind, host: str | None, port: int | None, path: str | None
) -> None:  # fmt: skip
    listen = parse_config({"listen": text}, "c.yml", {}).listen
    assert (listen.kind, listen.host, listen.port, listen.path) == (kind, host, port, path)
    assert listen.kind == kind.value  # a str enum: compares with "inet" etc.
    assert str(listen) == text


@pytest.mark.parametrize(
    "text",
    [
        "foo",
        "inet:127.0.0.1",
        "inet:127.0.0.1:0",
        "inet:127.0.0.1:65536",
        "inet:127.0.0.1:port",
        "inet::8891",
        "inet:::1:8891",
        "inet6:::1:8891",
        "inet6:[127.0.0.1]:8891",
        "unix:relative.sock",
        "tcp:127.0.0.1:8891",
        "inet:bad host:8891",
    ],
)
def test_bad_listen(text: str) -> None:
    message = one_problem({"listen": text})
    assert message.startswith(f'config.yml: listen: "{text}" is not a listen address')


def test_metrics_listen() -> None:
    assert parse_config({"metrics": {"listen": None}}, "c", {}).metrics.listen is None
    assert parse_config({"metrics": {"listen": False}}, "c", {}).metrics.listen is None
    message = one_problem({"metrics": {"listen": "unix:/run/metrics.sock"}})
    assert message.startswith('config.yml: metrics.listen: "unix:/run/metrics.sock" is not')
    assert "a unix socket is not supported here" in message


# --- relay networks ----------------------------------------------------------------------------


def test_host_bits_set() -> None:
    assert one_problem({"relay_networks": ["10.0.0.1/8"]}) == (
        'config.yml: relay_networks[0]: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)'
    )
    assert one_problem({"relay_networks": ["127.0.0.0/8", "2001:db8::1/32"]}) == (
        'config.yml: relay_networks[1]: "2001:db8::1/32" has host bits set '
        "(did you mean 2001:db8::/32?)"
    )


def test_bad_networks() -> None:
    found = problems({"relay_networks": ["printer", 42, "192.168.1.0/24", None]})
    assert found == [
        'config.yml: relay_networks[0]: "printer" is not an IPv4/IPv6 network',
        "config.yml: relay_networks[1]: 42 is not an IPv4/IPv6 network",
        "config.yml: relay_networks[3]: null is not an IPv4/IPv6 network",
    ]
    assert one_problem({"relay_networks": "10.0.0.0/8"}).startswith(
        'config.yml: relay_networks: "10.0.0.0/8" is not a list of networks'
    )


def test_is_relay() -> None:
    config = parse_config(
        {"relay_networks": ["192.168.1.0/24", "10.0.0.5", "2001:db8:1::/48"]}, "c", {}
    )
    # IPv4, edges of the CIDR
    assert is_relay(config, "192.168.1.0")
    assert is_relay(config, "192.168.1.77")
    assert is_relay(config, "192.168.1.255")
    assert not is_relay(config, "192.168.0.255")
    assert not is_relay(config, "192.168.2.0")
    # a bare address is a /32
    assert is_relay(config, "10.0.0.5")
    assert not is_relay(config, "10.0.0.4")
    assert not is_relay(config, "10.0.0.6")
    # IPv6, edges
    assert is_relay(config, "2001:db8:1::")
    assert is_relay(config, "2001:db8:1:ffff:ffff:ffff:ffff:ffff")
    assert not is_relay(config, "2001:db8:0:ffff:ffff:ffff:ffff:ffff")
    assert not is_relay(config, "2001:db8:2::")
    # IPv4-mapped IPv6 client addresses match as IPv4
    assert is_relay(config, "::ffff:192.168.1.10")
    assert is_relay(config, "::FFFF:10.0.0.5")
    assert not is_relay(config, "::ffff:192.168.2.10")
    # IPv4 addresses never match IPv6 networks and vice versa
    assert not is_relay(config, "::1")
    assert not is_relay(config, "127.0.0.1")
    # garbage
    for junk in ["", "localhost", "192.168.1", "192.168.1.1/32", "[::1]", "999.1.1.1", "::g"]:
        assert not is_relay(config, junk), junk


def test_is_relay_default_loopback() -> None:
    config = Config()
    assert is_relay(config, "127.0.0.1")
    assert is_relay(config, "127.255.255.255")
    assert is_relay(config, "::1")
    assert is_relay(config, "::ffff:127.0.0.1")
    assert not is_relay(config, "128.0.0.0")
    assert not is_relay(config, "::2")


def test_is_relay_with_a_mapped_network_in_the_config() -> None:
    config = parse_config({"relay_networks": ["::ffff:192.0.2.0/120"]}, "c", {})
    assert config.relay_networks == (IPv6Network("::ffff:192.0.2.0/120"),)
    assert is_relay(config, "::ffff:192.0.2.1")
    assert is_relay(config, "192.0.2.255")
    assert not is_relay(config, "192.0.3.0")


def test_is_relay_empty() -> None:
    config = parse_config({"relay_networks": []}, "c", {})
    assert not is_relay(config, "127.0.0.1")


def test_is_relay_survives_replace() -> None:
    config = dataclasses.replace(Config(), relay_networks=(IPv4Network("198.51.100.0/24"),))
    assert is_relay(config, "198.51.100.1")
    assert not is_relay(config, "127.0.0.1")


# --- headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["Received", "return-path", "X-Originating-IP", "x-enigmail", "X-Forwarded-For",
     "x-forward", "DKIM-Signature"],
)  # fmt: skip
def test_forbidden_sign_headers(name: str) -> None:
    message = one_problem({"sign_headers": ["from", name]})
    assert message.startswith(f'config.yml: sign_headers: ["{name.lower()}"] must not be signed')


def test_forbidden_sign_headers_all_named_in_one_line() -> None:
    message = one_problem({"sign_headers": ["from", "received", "subject", "x-forwarded-to"]})
    assert '["received", "x-forwarded-to"]' in message


def test_from_must_be_signed() -> None:
    message = one_problem({"sign_headers": ["to", "subject"], "oversign_headers": []})
    assert message.startswith('config.yml: sign_headers: ["to", "subject"] lacks from')
    assert "RFC 6376" in message


def test_bad_header_names_each_reported() -> None:
    assert problems({"sign_headers": ["from", "x bad", 5, "a:b"]}) == [
        'config.yml: sign_headers[1]: "x bad" is not a header field name',
        "config.yml: sign_headers[2]: 5 is not a header field name",
        'config.yml: sign_headers[3]: "a:b" is not a header field name',
    ]


def test_oversign_not_in_sign_list() -> None:
    message = one_problem({"sign_headers": ["from", "to"], "oversign_headers": ["from", "Date"]})
    assert message == (
        'config.yml: oversign_headers: ["date"] not in sign_headers '
        "(only signed headers can be oversigned)"
    )
    # the default oversign list is cut down to the headers signed
    config = parse_config({"sign_headers": ["subject", "from", "x-mailer"]}, "c", {})
    assert config.oversign_headers == ("from", "subject")


# --- other values ------------------------------------------------------------------------------


def test_expire_after() -> None:
    assert parse_config({"expire_after": 3600}, "c", {}).expire_after == 3600
    assert parse_config({"expire_after": None}, "c", {}).expire_after is None
    for bad in [0, -1, 1.5, "3600", True]:
        assert one_problem({"expire_after": bad}).startswith("config.yml: expire_after: ")


def test_limits() -> None:
    assert problems({"limits": {"max_header_bytes": 0, "max_headers": "many"}}) == [
        "config.yml: limits.max_header_bytes: 0 is not a positive whole number",
        'config.yml: limits.max_headers: "many" is not a positive whole number',
    ]


def test_bools_are_strict() -> None:
    assert one_problem({"sign_authenticated": "true"}) == (
        'config.yml: sign_authenticated: "true" is not true or false'
    )
    assert one_problem({"parent_domain_fallback": 1}) == (
        "config.yml: parent_domain_fallback: 1 is not true or false"
    )


# --- keys --------------------------------------------------------------------------------------


def test_keys_sources_keep_yaml_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        keys:
          redis: {}
          directory: /keys
        """,
    )
    assert [type(s) for s in load_config(path, {}).keys.sources] == [RedisSource, DirectorySource]
    path = write(
        tmp_path,
        """\
        keys:
          directory: /keys
          redis: {}
        """,
    )
    assert [type(s) for s in load_config(path, {}).keys.sources] == [DirectorySource, RedisSource]


def test_keys_need_a_source() -> None:
    assert one_problem({"keys": {"refresh_interval": 30}}) == (
        "config.yml: keys: no key source configured (expected directory, table and/or redis)"
    )


def test_table_problems() -> None:
    found = problems(
        {
            "keys": {
                "table": [
                    {"domain": "example.com", "selector": "s1", "key_file": "/k/1.pem"},
                    {"domain": "EXAMPLE.com", "selector": "s1", "key_file": "/k/2.pem"},
                    {"domain": "bad domain.com", "selector": "s..x", "key_file": "rel.pem"},
                    {"domain": "example.org"},
                    "nonsense",
                ]
            }
        }
    )
    assert found[0] == 'config.yml: keys.table[1]: "s1.example.com" is listed twice'
    assert found[1].startswith('config.yml: keys.table[2].domain: "bad domain.com" is not a dom')
    assert found[2].startswith('config.yml: keys.table[2].selector: "s..x" is not a DKIM selector')
    assert found[3] == 'config.yml: keys.table[2].key_file: "rel.pem" is not an absolute path'
    assert found[4].startswith("config.yml: keys.table[3].selector: missing")
    assert found[5].startswith("config.yml: keys.table[3].key_file: missing")
    assert found[6].startswith('config.yml: keys.table[4]: "nonsense" is not a mapping')
    assert len(found) == 7


def test_same_domain_two_selectors_is_fine() -> None:
    config = parse_config(
        {
            "keys": {
                "table": [
                    {"domain": "example.com", "selector": "rsa", "key_file": "/k/rsa.pem"},
                    {"domain": "example.com", "selector": "ed", "key_file": "/k/ed.pem"},
                ]
            }
        },
        "c",
        {},
    )
    table = config.keys.table
    assert table is not None
    assert [e.selector for e in table.entries] == ["rsa", "ed"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM.", "example.com"),
        ("mail.example.co.uk", "mail.example.co.uk"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("1und1.de", "1und1.de"),
    ],
)
def test_parse_domain(text: str, expected: str) -> None:
    assert parse_domain(text) == expected


@pytest.mark.parametrize(
    "text",
    ["com", "", "-a.example", "a-.example", "a..example", "a+b.example", "xn--zz-.example",
     "a" * 64 + ".example", "exa mple.com", "192.0.2.1", "example.123"],
)  # fmt: skip
def test_bad_domain(text: str) -> None:
    with pytest.raises(ValueError, match="is not a domain name"):
        parse_domain(text)


def test_selectors() -> None:
    assert parse_selector("dkim") == "dkim"
    assert parse_selector("s2024.eu") == "s2024.eu"
    assert parse_selector("Rsa-2048") == "rsa-2048"  # DNS matches case-insensitively
    assert parse_selector("s_1") == "s_1"  # what Mailcow's UI stores, and DNS serves
    for bad in ["", "a b", "a+b", ".x", "x..y", "-x"]:
        with pytest.raises(ValueError, match="is not a DKIM selector"):
            parse_selector(bad)


def test_redis_problems() -> None:
    found = problems(
        {
            "keys": {
                "redis": {
                    "host": "redis mailcow",
                    "port": 70000,
                    "db": -1,
                    "password_env": "1BAD",
                    "password_file": "secret.txt",
                    "keys_hash": "",
                    "timeout": 0,
                }
            }
        }
    )
    assert found == [
        'config.yml: keys.redis.host: "redis mailcow" is not a host name or IP address',
        "config.yml: keys.redis.port: 70000 is not a TCP port (1-65535)",
        "config.yml: keys.redis.db: -1 is not a whole number >= 0",
        'config.yml: keys.redis.password_env: "1BAD" is not an environment variable name',
        'config.yml: keys.redis.password_file: "secret.txt" is not an absolute path',
        'config.yml: keys.redis.keys_hash: "" is not a Redis key name (non-empty, no spaces)',
        "config.yml: keys.redis.timeout: 0 is not a positive number of seconds",
    ]


def test_ed25519_prefix_must_not_clash_with_rsa_hashes() -> None:
    message = one_problem({"keys": {"redis": {"ed25519_key_prefix": "DKIM_"}}})
    assert message.startswith('config.yml: keys.redis.ed25519_key_prefix: "DKIM_" makes')


def test_the_three_rsa_hashes_must_differ() -> None:
    """selectors_hash pointed at the private keys would read PEMs where names belong."""
    message = one_problem({"keys": {"redis": {"selectors_hash": "DKIM_PRIV_KEYS"}}})
    assert message == (
        'config.yml: keys.redis.keys_hash: "DKIM_PRIV_KEYS" is already selectors_hash; '
        "the three must differ"
    )


def test_mailcow_networks_need_redis() -> None:
    assert one_problem({"relay_networks_from_mailcow": "forwarding_hosts"}) == (
        'config.yml: relay_networks_from_mailcow: "forwarding_hosts" needs a keys.redis '
        "source, and none is configured"
    )


# --- secrets -----------------------------------------------------------------------------------


def test_password_never_stored(tmp_path: Path) -> None:
    secret = "s3cr3t-Redis-Passw0rd"
    env = {"REDISPASS": secret, "DKIM_SIDECAR_REDIS_HOST": "redis"}
    config = load_config(str(EXAMPLE), env)
    assert secret not in repr(config)
    assert secret not in str(config)
    for value in dataclasses.astuple(config):
        assert secret not in repr(value)
    redis = config.keys.redis
    assert redis is not None
    assert redis.password_env == "REDISPASS"
    # read only when asked, at connect time
    assert redis.resolve_password(env) == secret
    assert redis.resolve_password({}) is None


def test_password_keys_are_names_not_secrets() -> None:
    found = problems({"keys": {"redis": {"password": "hunter2"}}})
    assert found == ["config.yml: keys.redis.password: unknown key (did you mean password_env?)"]
    assert "hunter2" not in found[0]


def test_redis_username() -> None:
    config = parse_config({"keys": {"redis": {"username": "dkim-sidecar"}}}, "config.yml", {})
    assert config.keys.redis is not None and config.keys.redis.username == "dkim-sidecar"
    assert RedisSource().username is None  # Mailcow's default user
    for bad in ("", "two words", "tab\tuser", 7):
        found = problems({"keys": {"redis": {"username": bad}}})
        assert len(found) == 1 and found[0].startswith("config.yml: keys.redis.username: ")
        assert "Redis ACL user name" in found[0]


def test_password_file_wins(tmp_path: Path) -> None:
    secret_file = tmp_path / "redis-password"
    secret_file.write_text("from-file\n", encoding="utf-8")
    redis = RedisSource(password_file=str(secret_file))
    assert redis.resolve_password({"REDISPASS": "from-env"}) == "from-file"
    assert RedisSource(password_env=None).resolve_password({"REDISPASS": "x"}) is None


# --- environment overrides ---------------------------------------------------------------------


def test_env_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        keys:
          directory: /keys
          redis: {host: redis-mailcow}
        """,
    )
    env = {
        "DKIM_SIDECAR_LISTEN": "inet:0.0.0.0:10025",
        "DKIM_SIDECAR_RELAY_NETWORKS": "192.168.1.0/24, 10.0.0.5  2001:db8::/32,",
        "DKIM_SIDECAR_METRICS_LISTEN": "inet:0.0.0.0:9100",
        "DKIM_SIDECAR_LOG_LEVEL": "DEBUG",
        "DKIM_SIDECAR_LOG_FORMAT": "json",
        "DKIM_SIDECAR_REDIS_HOST": "10.1.2.3",
        "DKIM_SIDECAR_KEYS_DIRECTORY": "/other/keys",
    }
    config = load_config(path, env)
    assert str(config.listen) == "inet:0.0.0.0:10025"
    assert config.relay_networks == (
        IPv4Network("192.168.1.0/24"),
        IPv4Network("10.0.0.5/32"),
        IPv6Network("2001:db8::/32"),
    )
    assert is_relay(config, "192.168.1.20")
    assert not is_relay(config, "127.0.0.1")
    assert str(config.metrics.listen) == "inet:0.0.0.0:9100"
    assert config.log_level is LogLevel.DEBUG
    assert config.log_format is LogFormat.JSON
    assert config.keys.sources == (DirectorySource("/other/keys"), RedisSource(host="10.1.2.3"))


def test_env_overrides_defaults_without_file() -> None:
    config = load_config(None, {"DKIM_SIDECAR_KEYS_DIRECTORY": "/keys"})
    assert config.keys.sources == (DirectorySource("/keys"),)


@pytest.mark.parametrize("value", ["", "off", "OFF"])
def test_env_metrics_off(value: str) -> None:
    assert load_config(None, {"DKIM_SIDECAR_METRICS_LISTEN": value}).metrics.listen is None


def test_env_empty_counts_as_unset() -> None:
    env = {
        "DKIM_SIDECAR_LISTEN": "",
        "DKIM_SIDECAR_RELAY_NETWORKS": " ",
        "DKIM_SIDECAR_LOG_LEVEL": "",
    }
    assert load_config(None, env) == Config()


def test_env_errors_name_the_variable() -> None:
    found = problems(
        {"keys": {"table": []}},
        {
            "DKIM_SIDECAR_LISTEN": "foo",
            "DKIM_SIDECAR_RELAY_NETWORKS": "10.0.0.0/8,10.0.0.1/8 nonsense",
            "DKIM_SIDECAR_METRICS_LISTEN": "unix:/x",
            "DKIM_SIDECAR_LOG_LEVEL": "verbose",
            "DKIM_SIDECAR_LOG_FORMAT": "xml",
            "DKIM_SIDECAR_REDIS_HOST": "redis",
            "DKIM_SIDECAR_KEYS_DIRECTORY": "/keys",
        },
    )
    assert found[0].startswith('env DKIM_SIDECAR_LISTEN: "foo" is not a listen address')
    assert found[1] == (
        'env DKIM_SIDECAR_RELAY_NETWORKS: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)'
    )
    assert found[2] == 'env DKIM_SIDECAR_RELAY_NETWORKS: "nonsense" is not an IPv4/IPv6 network'
    assert found[3].startswith('env DKIM_SIDECAR_METRICS_LISTEN: "unix:/x" is not a listen')
    assert (
        found[4]
        == 'env DKIM_SIDECAR_LOG_LEVEL: "verbose" is not one of: debug, info, warning, error'
    )
    assert found[5] == 'env DKIM_SIDECAR_LOG_FORMAT: "xml" is not one of: text, json'
    assert found[6] == (
        'env DKIM_SIDECAR_REDIS_HOST: "redis" is set, but no keys.redis source is configured'
    )
    assert found[7] == (
        'env DKIM_SIDECAR_KEYS_DIRECTORY: "/keys" is set, '
        "but no keys.directory source is configured"
    )
    assert len(found) == 8


def test_env_keys_directory_must_be_absolute() -> None:
    assert one_problem({}, {"DKIM_SIDECAR_KEYS_DIRECTORY": "keys"}) == (
        'env DKIM_SIDECAR_KEYS_DIRECTORY: "keys" is not an absolute path'
    )


def test_file_and_env_problems_together(tmp_path: Path) -> None:
    path = write(tmp_path, "log_level: loud\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"DKIM_SIDECAR_LOG_FORMAT": "xml"})
    assert info.value.problems == [
        f'{path}: log_level: "loud" is not one of: debug, info, warning, error',
        'env DKIM_SIDECAR_LOG_FORMAT: "xml" is not one of: text, json',
    ]


# --- reload ------------------------------------------------------------------------------------


def test_what_needs_a_restart_is_kept_and_named() -> None:
    old = Config()
    assert keep_restart_settings(old, old) == (old, [])
    changed = dataclasses.replace(old, log_level=LogLevel.DEBUG, relay_networks=())
    assert keep_restart_settings(old, changed) == (changed, [])
    moved = parse_config({"listen": "inet:0.0.0.0:8891"}, "c", {})
    kept, names = keep_restart_settings(old, moved)
    assert names == ["listen"] and kept.listen == old.listen
    both = parse_config({"listen": "unix:/run/m.sock", "metrics": {"listen": None}}, "c", {})
    kept, names = keep_restart_settings(old, both)
    assert names == ["listen", "metrics.listen"]
    assert kept.listen == old.listen and kept.metrics == old.metrics


def test_a_header_cap_past_the_servers_packet_limit_needs_a_restart() -> None:
    """The server takes its packet limit at start; a reload that raised the header cap past
    it would let the session keep fields the server ends the connection on."""
    old = Config()
    within = parse_config({"limits": {"max_header_bytes": 512 * 1024}}, "c", {})
    assert keep_restart_settings(old, within) == (within, [])  # the packet limit stays
    past = parse_config({"limits": {"max_header_bytes": 8 << 20}}, "c", {})
    assert packet_limit(past) > packet_limit(old)
    kept, names = keep_restart_settings(old, past)
    assert names == ["limits.max_header_bytes"]
    assert kept.limits.max_header_bytes == old.limits.max_header_bytes
    assert kept.limits.max_headers == past.limits.max_headers
    # what counts is the limit the server took at start, not the last reload's
    started = parse_config({"limits": {"max_header_bytes": 4 << 20}}, "c", {})
    lowered = parse_config({"limits": {"max_header_bytes": 2 << 20}}, "c", {})
    limit = packet_limit(started)
    assert keep_restart_settings(started, lowered, limit) == (lowered, [])
    assert keep_restart_settings(lowered, started, limit) == (started, [])  # back up: fine
    kept, names = keep_restart_settings(lowered, past, limit)  # 8 MiB: past it
    assert names == ["limits.max_header_bytes"] and kept.limits == lowered.limits


# --- the example file --------------------------------------------------------------------------


def test_example_file_loads() -> None:
    config = load_config(str(EXAMPLE), {})
    assert config.source == str(EXAMPLE)
    assert is_relay(config, "192.168.1.50")
    assert config.keys.redis == RedisSource()
    assert config.sign_headers == DEFAULT_SIGN_HEADERS
    assert config.oversign_headers == DEFAULT_OVERSIGN_HEADERS


def test_example_file_mentions_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = [
        "listen", "relay_networks", "sign_authenticated", "domain_from",
        "parent_domain_fallback", "on_error", "canonicalization", "sign_headers",
        "oversign_headers", "expire_after", "long_lines", "limits", "max_header_bytes",
        "max_headers", "keys", "directory", "table", "domain", "selector", "key_file", "redis",
        "host", "port", "db", "password_env", "password_file", "selectors_hash", "keys_hash",
        "pub_keys_hash", "ed25519_key_prefix", "timeout", "refresh_interval",
        "relay_networks_from_mailcow", "metrics", "per_domain_labels", "log_format", "log_level",
    ]  # fmt: skip
    for key in keys:
        assert f"{key}:" in text, key


# --- is_relay against the ipaddress module -----------------------------------------------------

_v4_nets = st.builds(
    lambda n, p: IPv4Network((n, p), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
_v6_nets = st.builds(
    lambda n, p: IPv6Network((n, p), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
)
# ::ffff:a.b.c.d/n (n ≥ 96), IPv4-mapped networks: random IPv6 networks almost never are one
_mapped_nets = st.builds(
    lambda n, p: IPv6Network((int(_MAPPED.network_address) | n, p), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(96, 128),
)


def _mapped(addr: IPv4Address) -> IPv6Address:
    return IPv6Address(int(_MAPPED.network_address) | int(addr))


@given(
    st.lists(st.one_of(_v4_nets, _v6_nets, _mapped_nets), max_size=4),
    st.lists(st.integers(0, 2**32 - 1), max_size=6),
    st.lists(st.integers(0, 2**128 - 1), max_size=6),
)
def test_is_relay_matches_ipaddress(
    networks: list[IPv4Network | IPv6Network], v4: list[int], v6: list[int]
) -> None:
    # Postfix reports a client on an IPv4-mapped address as IPv4: an IPv4 client is a relay when
    # it is in an IPv4 network or its mapped form is in a mapped one (a subnet of ::ffff:0:0/96).
    # A network with other IPv6 addresses too, such as ::/0, matches IPv6 clients only, as in
    # Postfix.
    mapped = [n for n in networks if isinstance(n, IPv6Network) and n.subnet_of(_MAPPED)]
    # aim some addresses at the networks' edges (a mapped network's as IPv4 addresses)
    for net in networks:
        low, high = int(net.network_address), int(net.broadcast_address)
        if net.version == 6 and net not in mapped:
            v6 += [low, high]
            continue
        low, high = low & 0xFFFFFFFF, high & 0xFFFFFFFF
        v4 += [low, high, *([high + 1] if high < 2**32 - 1 else [])]
    config = parse_config({"relay_networks": [str(n) for n in networks]}, "c", {})
    for number in v4:
        addr = IPv4Address(number)
        expected = any(addr in n for n in networks if n.version == 4) or any(
            _mapped(addr) in n for n in mapped
        )
        assert is_relay(config, str(addr)) == expected, addr
        # the IPv4-mapped IPv6 spelling gives the same answer
        assert is_relay(config, f"::ffff:{addr}") == expected, addr
    for number in v6:
        addr6 = IPv6Address(number)
        if addr6.ipv4_mapped is not None:
            continue  # an IPv4 client, above
        assert is_relay(config, str(addr6)) == any(addr6 in n for n in networks if n.version == 6)


def test_the_default_password_is_mailcows_redispass_and_nothing_else() -> None:
    """Mailcow runs Redis (no Valkey): REDISPASS, and no fallback to another variable."""
    source = parse_config({"keys": {"redis": {}}}, "c.yml", {}).keys.redis
    assert source is not None
    assert source.resolve_password({"REDISPASS": "r", "VALKEYPASS": "v"}) == "r"
    assert source.resolve_password({"REDISPASS": "", "VALKEYPASS": "v"}) is None
    assert source.resolve_password({}) is None


def test_table_domain_that_idna2003_would_map_onto_another_name_is_refused(tmp_path: Path) -> None:
    # Python's idna codec turns straße.de into strasse.de: someone else's domain
    entry = {"domain": "straße.de", "selector": "s1", "key_file": str(tmp_path / "k.key")}
    with pytest.raises(ConfigError, match=r"keys\.table\[0\]\.domain"):
        parse_config({"keys": {"table": [entry]}}, "c.yml", {})
