"""Mailcow's keys from Redis, kept fresh live: the real `dkim-sidecar run` process against a
real redis-server with `requirepass` (password in $REDISPASS, as in mailcow.conf), driven over
the milter protocol as Postfix would drive it.

Keys go into Redis the way Mailcow's PHP writes them (tests/harness/redis.py: PKCS#8 when
generated, PKCS#1 when imported, LF line ends), and every signature is checked by dkimpy
against a DNS table built from DKIM_PUB_KEYS, the value Mailcow's UI tells the admin to publish.

Refresh intervals are short (REFRESH seconds); every wait is for an event, bounded generously
(POLL), and nothing is timed.
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dkim_sidecar.dkim.header import split_message
from dkim_sidecar.milter.client import Result
from harness import procfs
from harness.dkimcheck import verify_all as verify
from harness.redis import (
    RedisServer,
    free_port,
    mailcow_pub_b64,
    seed_ed25519,
    seed_forwarding_host,
    seed_mailcow,
)
from harness.sidecar import Sidecar, clean_env, wait_for

RELAY = "192.0.2.10"  # in relay_networks
OUTSIDE = "203.0.113.9"  # in no relay network, ever
REFRESH = 0.5  # seconds between key refreshes in every sidecar here
POLL = 30.0  # how long a change in Redis may take to show in the milter, on a loaded machine
ED_PREFIX = "DKIM_ED25519_"

# Long and random: a leak cannot hide behind a short or common string.
PASSWORD = secrets.token_urlsafe(48)
WRONG_PASSWORD = secrets.token_urlsafe(48)


# -- keys, as Mailcow stores them -----------------------------------------------------------------


@dataclass(frozen=True)
class MailcowKey:
    """One domain's DKIM key as Mailcow's UI makes (PKCS#8) or imports (PKCS#1) it."""

    domain: str
    selector: str
    pem: bytes

    @property
    def pub_b64(self) -> str:
        return mailcow_pub_b64(self.pem)

    def seed(self, client: redis.Redis) -> None:
        seed_mailcow(client, self.domain, self.selector, self.pem, self.pub_b64)

    def delete(self, client: redis.Redis) -> None:
        """Mailcow's dkim('delete'): all three entries of the domain."""
        client.hdel("DKIM_PUB_KEYS", self.domain)
        client.hdel("DKIM_PRIV_KEYS", f"{self.selector}.{self.domain}")
        client.hdel("DKIM_SELECTORS", self.domain)

    @property
    def body_lines(self) -> list[str]:
        """The base64 lines of the private key: none may ever show in a log."""
        return [line for line in self.pem.decode().splitlines() if not line.startswith("-----")]


def generated(domain: str, selector: str, bits: int = 1024) -> MailcowKey:
    """What Mailcow's "add DKIM key" stores: PKCS#8, LF."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return MailcowKey(domain, selector, pem)


def imported(domain: str, selector: str, bits: int = 1024) -> MailcowKey:
    """What an admin pastes into Mailcow's import form: PKCS#1, CR LF (Mailcow makes it LF)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return MailcowKey(domain, selector, pem.replace(b"\n", b"\r\n"))


@dataclass(frozen=True)
class Ed25519Key:
    domain: str
    selector: str
    key: ed25519.Ed25519PrivateKey

    @property
    def pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def dns(self) -> dict[bytes, bytes]:
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        name = f"{self.selector}._domainkey.{self.domain}.".encode()
        return {name: b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)}


@dataclass(frozen=True)
class Keys:
    gen: MailcowKey  # generated in Mailcow's UI, 2048 bits (Mailcow's default)
    imp: MailcowKey  # imported, PKCS#1
    dual: MailcowKey  # RSA half of a domain that also has an Ed25519 key
    ed: Ed25519Key
    spare: list[MailcowKey]  # for domains the tests add and delete


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        gen=generated("gen.example", "dkim", 2048),
        imp=imported("imp.example", "s2019"),
        dual=generated("dual.example", "dkim"),
        ed=Ed25519Key("dual.example", "ed2024", ed25519.Ed25519PrivateKey.generate()),
        spare=[generated(f"spare{i}.example", f"sel{i}") for i in range(4)],
    )


def mailcow_dns(client: redis.Redis) -> dict[bytes, bytes]:
    """The DNS a Mailcow admin publishes: `<selector>._domainkey.<domain>` TXT
    `v=DKIM1; k=rsa; p=<DKIM_PUB_KEYS value>`, for every domain in Redis now."""
    selectors = client.hgetall("DKIM_SELECTORS")
    pubs = client.hgetall("DKIM_PUB_KEYS")
    return {
        sel + b"._domainkey." + dom + b".": b"v=DKIM1; k=rsa; p=" + pubs[dom]
        for dom, sel in selectors.items()
        if dom in pubs
    }


# -- messages and verdicts ------------------------------------------------------------------------


def msg(domain: str, body: bytes = b"Hello from a printer.\r\n") -> bytes:
    return (
        f"From: Scanner <scanner@{domain}>\r\n"
        "To: Bob <bob@example.net>\r\n"
        "Subject: scan\r\n"
        "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{secrets.token_hex(6)}@{domain}>\r\n"
        "\r\n"
    ).encode() + body


def sigs(r: Result) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature in the signed message, topmost first."""
    fields, _ = split_message(r.message)
    out = []
    for f in fields:
        if f.name == "dkim-signature":
            text = re.sub(r"\s+", "", f.raw.decode().partition(":")[2])
            out.append(dict(t.split("=", 1) for t in text.split(";") if "=" in t))
    assert len(out) == len(r.signatures)
    return out


def signed(r: Result) -> bool:
    return bool(r.signatures)


def unsigned_no_key(r: Result) -> bool:
    # let through unsigned, decided at end of header (answered at the end: SMFIP_NR_EOH)
    return r.action == "accept" and r.stage == "eom" and not r.signatures


def let_go_at_connect(r: Result) -> bool:
    return (r.action, r.stage) == ("accept", "connect") and not r.signatures


def send_until(
    s: Sidecar,
    domain: str,
    want: Callable[[Result], bool],
    client_ip: str = RELAY,
    timeout: float = POLL,
) -> Result:
    """Send a message (a new one each time) until the milter's answer satisfies `want`."""
    deadline = time.monotonic() + timeout
    while True:
        r = s.send(msg(domain), client_ip)
        if want(r):
            return r
        if time.monotonic() > deadline:
            raise AssertionError(
                f"after {timeout} s, a message from {domain} via {client_ip} still ends "
                f"{r.action} at {r.stage} with {len(r.signatures)} signature(s)"
            )
        time.sleep(0.05)


def metric_until(s: Sidecar, name: str, value: float, timeout: float = POLL) -> None:
    wait_for(lambda: s.metric(name) == value, timeout, f"{name} == {value}")


def no_key_count(s: Sidecar) -> float:
    return s.metric("dkim_sidecar_messages_total", outcome="skipped", reason="no_key")


# -- processes ------------------------------------------------------------------------------------


def sidecar_config(port: int, **redis_options: Any) -> dict[str, Any]:
    return {
        "relay_networks": ["192.0.2.0/24"],
        "keys": {
            "redis": {"host": "127.0.0.1", "port": port, **redis_options},
            "refresh_interval": REFRESH,
        },
    }


def assert_nothing_leaked(s: Sidecar, secrets_: list[str], key_lines: list[str]) -> None:
    """Neither a Redis password nor a line of a private key in the log, /metrics, /readyz,
    /healthz or any file the sidecar's directory holds."""
    texts = {"log": s.log()}
    for path in ("/metrics", "/readyz", "/healthz"):
        texts[path] = s.http(path)[1]
    for f in s.dir.rglob("*"):
        if f.is_file():
            texts[str(f)] = f.read_text(errors="replace")
    for where, text in texts.items():
        for secret in secrets_:
            assert secret not in text, f"a Redis password is in {where}"
        for line in key_lines:
            assert line not in text, f"private key material is in {where}"


@contextlib.contextmanager
def running(
    workdir: Path,
    config: dict[str, Any],
    env: dict[str, str],
    *,
    wait_ready: bool = True,
    key_lines: list[str] | None = None,
) -> Iterator[Sidecar]:
    """A sidecar process for one block: stopped (by its PID) at the end whatever happens, then
    checked: clean exit, no traceback, nothing secret written anywhere."""
    s = Sidecar(workdir, config, env)
    try:
        s.start(wait_ready=wait_ready)
        yield s
        assert_nothing_leaked(s, [PASSWORD, WRONG_PASSWORD], key_lines or [])  # while it runs
    finally:
        rc = s.stop()
    assert rc == 0, s.log()
    assert "Traceback" not in s.log(), s.log()
    assert_nothing_leaked(s, [PASSWORD, WRONG_PASSWORD], key_lines or [])  # and its last words


# -- the shared Redis and sidecar -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as srv:
        yield srv


@pytest.fixture(scope="module")
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = server.client()
    yield client
    client.close()


def all_key_lines(keys: Keys) -> list[str]:
    lines = keys.gen.body_lines + keys.imp.body_lines + keys.dual.body_lines
    for k in keys.spare:
        lines += k.body_lines
    return lines + [x for x in keys.ed.pem.decode().splitlines() if not x.startswith("-")]


@pytest.fixture(scope="module")
def seeded(admin: redis.Redis, keys: Keys) -> redis.Redis:
    """Mailcow's Redis with three domains, one of them also with an Ed25519 key."""
    keys.gen.seed(admin)
    keys.imp.seed(admin)
    keys.dual.seed(admin)
    seed_ed25519(admin, keys.ed.domain, keys.ed.selector, keys.ed.pem, prefix=ED_PREFIX)
    return admin


@pytest.fixture(scope="module")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory, server: RedisServer, seeded: redis.Redis, keys: Keys
) -> Iterator[Sidecar]:
    """The shared Redis, forwarding hosts as relay networks; started once for the module."""
    config = sidecar_config(server.port, ed25519_key_prefix=ED_PREFIX)
    config["relay_networks_from_mailcow"] = "forwarding_hosts"
    with running(
        tmp_path_factory.mktemp("sidecar"),
        config,
        {"REDISPASS": PASSWORD},
        key_lines=all_key_lines(keys),
    ) as s:
        yield s


# -- signing from Redis, live ---------------------------------------------------------------------


def test_mailcow_keys_are_stored_as_mailcow_stores_them(
    sidecar: Sidecar, admin: redis.Redis, keys: Keys
) -> None:
    """The premise of this module: the harness writes what Mailcow writes."""
    gen = admin.hget("DKIM_PRIV_KEYS", "dkim.gen.example")
    imp = admin.hget("DKIM_PRIV_KEYS", "s2019.imp.example")
    assert isinstance(gen, bytes) and isinstance(imp, bytes)
    assert gen.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    assert imp.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")  # PKCS#1
    assert b"\r" not in gen + imp and not imp.endswith(b"\n")  # LF, trimmed
    assert admin.hget("DKIM_SELECTORS", "imp.example") == b"s2019"
    assert admin.hget("DKIM_PUB_KEYS", "gen.example") == keys.gen.pub_b64.encode()
    assert b"-----" not in keys.gen.pub_b64.encode()  # no armour


@pytest.mark.parametrize(
    ("domain", "selector", "bits"),
    [("gen.example", "dkim", 2048), ("imp.example", "s2019", 1024)],
    ids=["generated-pkcs8", "imported-pkcs1"],
)
def test_signed_with_the_right_selector(
    sidecar: Sidecar, admin: redis.Redis, domain: str, selector: str, bits: int
) -> None:
    r = sidecar.send(msg(domain), RELAY)
    assert (r.action, r.stage) == ("accept", "eom")
    assert len(r.signatures) == 1
    t = sigs(r)[0]
    assert (t["d"], t["s"], t["a"]) == (domain, selector, "rsa-sha256")
    assert verify(r.message, mailcow_dns(admin)) == [True]
    # a signature over a changed body fails: dkimpy really checked it
    assert verify(r.message.replace(b"printer", b"Printer"), mailcow_dns(admin)) == [False]
    assert sidecar.metric("dkim_sidecar_redis_up") == 1
    assert sidecar.http("/readyz")[0] == 200


def test_clients_outside_relay_networks_are_not_signed(sidecar: Sidecar) -> None:
    r = sidecar.send(msg("gen.example"), OUTSIDE)
    assert let_go_at_connect(r)


def test_new_domain_is_signed_after_a_refresh_without_restart(
    sidecar: Sidecar, admin: redis.Redis, keys: Keys
) -> None:
    new = keys.spare[0]
    assert sidecar.proc is not None
    pid = sidecar.proc.pid
    assert unsigned_no_key(sidecar.send(msg(new.domain), RELAY))
    new.seed(admin)
    try:
        r = send_until(sidecar, new.domain, signed)  # within POLL: a few refreshes
        t = sigs(r)[0]
        assert (t["d"], t["s"]) == (new.domain, new.selector)
        assert verify(r.message, mailcow_dns(admin)) == [True]
        assert sidecar.proc.pid == pid and sidecar.proc.poll() is None
        assert sidecar.log().count(" starting ") == 1  # no restart
    finally:
        new.delete(admin)


def test_deleted_domain_stops_being_signed(
    sidecar: Sidecar, admin: redis.Redis, keys: Keys
) -> None:
    gone = keys.spare[1]
    gone.seed(admin)
    try:
        r = send_until(sidecar, gone.domain, signed)
        assert verify(r.message, mailcow_dns(admin)) == [True]
    finally:
        gone.delete(admin)
    before = no_key_count(sidecar)
    send_until(sidecar, gone.domain, unsigned_no_key)
    assert no_key_count(sidecar) > before
    # the others are untouched
    r = sidecar.send(msg("gen.example"), RELAY)
    assert verify(r.message, mailcow_dns(admin)) == [True]


def test_garbage_pem_for_one_domain_leaves_the_others_working(
    sidecar: Sidecar, admin: redis.Redis, keys: Keys
) -> None:
    body = secrets.token_urlsafe(60)  # random, so that it can be searched for
    garbage = f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----".encode()
    admin.hset("DKIM_SELECTORS", "bad.example", "broken")
    admin.hset("DKIM_PRIV_KEYS", "broken.bad.example", garbage)
    admin.hset("DKIM_PUB_KEYS", "bad.example", keys.gen.pub_b64)
    try:
        metric_until(sidecar, "dkim_sidecar_key_problems", 1)
        wait_for(
            lambda: any(
                "key problem" in line and "broken._domainkey.bad.example" in line
                for line in sidecar.log().splitlines()
            ),
            POLL,
            "the log line naming the broken key",
        )
        assert body not in sidecar.log() and body[:20] not in sidecar.log()
        assert unsigned_no_key(sidecar.send(msg("bad.example"), RELAY))
        dns = mailcow_dns(admin)
        for domain in ("gen.example", "imp.example"):
            r = sidecar.send(msg(domain), RELAY)
            assert verify(r.message, dns) == [True], domain
        assert sidecar.metric("dkim_sidecar_redis_up") == 1
        assert sidecar.http("/readyz")[0] == 200
    finally:
        admin.hdel("DKIM_SELECTORS", "bad.example")
        admin.hdel("DKIM_PRIV_KEYS", "broken.bad.example")
        admin.hdel("DKIM_PUB_KEYS", "bad.example")
    metric_until(sidecar, "dkim_sidecar_key_problems", 0)


def test_ed25519_beside_mailcow_rsa_gives_a_dual_signature(
    sidecar: Sidecar, admin: redis.Redis, keys: Keys
) -> None:
    r = sidecar.send(msg("dual.example"), RELAY)
    assert len(r.signatures) == 2
    top, second = sigs(r)
    assert (top["a"], top["s"]) == ("rsa-sha256", "dkim")  # RSA topmost, for old verifiers
    assert (second["a"], second["s"]) == ("ed25519-sha256", "ed2024")
    assert top["d"] == second["d"] == "dual.example"
    dns = mailcow_dns(admin) | keys.ed.dns
    assert verify(r.message, dns) == [True, True]
    assert verify(r.message.replace(b"printer", b"Printer"), dns) == [False, False]
    assert sidecar.metric("dkim_sidecar_signatures_total", algorithm="ed25519-sha256") >= 1


def test_forwarding_hosts_from_mailcow_are_relay_networks_live(
    sidecar: Sidecar, admin: redis.Redis
) -> None:
    forwarder, beside = "198.51.100.7", "198.51.100.77"  # inside and outside 198.51.100.0/28
    forwarder_v6 = "2001:db8:77::25"
    assert let_go_at_connect(sidecar.send(msg("gen.example"), forwarder))
    seed_forwarding_host(admin, "198.51.100.0/28", keep_spam=False)
    seed_forwarding_host(admin, "2001:db8:77::/48", keep_spam=True)
    try:
        r = send_until(sidecar, "gen.example", signed, client_ip=forwarder)
        assert verify(r.message, mailcow_dns(admin)) == [True]
        r = sidecar.send(msg("gen.example"), forwarder_v6)
        assert verify(r.message, mailcow_dns(admin)) == [True]
        assert let_go_at_connect(sidecar.send(msg("gen.example"), beside))
        assert let_go_at_connect(sidecar.send(msg("gen.example"), OUTSIDE))
        r = sidecar.send(msg("gen.example"), RELAY)  # the config's own network
        assert verify(r.message, mailcow_dns(admin)) == [True]
    finally:
        # Mailcow's fwdhost('delete') removes both fields
        admin.hdel("WHITELISTED_FWD_HOST", "198.51.100.0/28")
        admin.hdel("KEEP_SPAM", "198.51.100.0/28")
    send_until(sidecar, "gen.example", let_go_at_connect, client_ip=forwarder)
    r = sidecar.send(msg("gen.example"), forwarder_v6)  # still listed
    assert verify(r.message, mailcow_dns(admin)) == [True]
    admin.hdel("WHITELISTED_FWD_HOST", "2001:db8:77::/48")
    admin.hdel("KEEP_SPAM", "2001:db8:77::/48")
    send_until(sidecar, "gen.example", let_go_at_connect, client_ip=forwarder_v6)
    assert verify(sidecar.send(msg("gen.example"), RELAY).message, mailcow_dns(admin)) == [True]


def test_password_never_in_log_or_metrics(sidecar: Sidecar, admin: redis.Redis, keys: Keys) -> None:
    """Also checked when every sidecar here stops; this one looks while it runs."""
    r = sidecar.send(msg("gen.example"), RELAY)
    assert verify(r.message, mailcow_dns(admin)) == [True]
    assert_nothing_leaked(sidecar, [PASSWORD, WRONG_PASSWORD], all_key_lines(keys))
    assert "dkim_sidecar_redis_up 1.0" in sidecar.http("/metrics")[1]


# -- Redis trouble: each with a Redis and a sidecar of its own ------------------------------------


def test_wrong_password(tmp_path: Path, server: RedisServer, seeded: redis.Redis) -> None:
    """A clear error in the log, not ready, and mail still passes (unsigned, no_key)."""
    config = sidecar_config(server.port)
    config["log_level"] = "debug"  # the most text there is, for the leak check
    with running(tmp_path, config, {"REDISPASS": WRONG_PASSWORD}, wait_ready=False) as s:
        s.wait_log("authentication failed", timeout=POLL)
        line = next(x for x in s.log().splitlines() if "authentication failed" in x)
        assert f"redis 127.0.0.1:{server.port}" in line
        assert "REDISPASS" in line  # tells the admin what to check
        status, why = s.http("/readyz")
        assert status == 503, (status, why)
        assert "key" in why
        r = s.send(msg("gen.example"), RELAY)
        assert unsigned_no_key(r)
        assert no_key_count(s) == 1
        assert s.metric("dkim_sidecar_redis_up") == 0
        assert s.metric("dkim_sidecar_key_refreshes_total", result="ok") == 0
        assert s.metric("dkim_sidecar_key_refreshes_total", result="partial") >= 1


def test_fixed_password_file_takes_effect_at_sighup(
    tmp_path: Path, server: RedisServer, seeded: redis.Redis
) -> None:
    """A Docker secret with the wrong password, corrected by the admin: SIGHUP picks it up."""
    secret = tmp_path / "secrets" / "redispass"
    secret.parent.mkdir()
    secret.write_text(WRONG_PASSWORD + "\n")
    config = sidecar_config(server.port, password_file=str(secret))
    with running(tmp_path / "sidecar", config, {}, wait_ready=False) as s:
        s.wait_log("authentication failed", timeout=POLL)
        assert unsigned_no_key(s.send(msg("gen.example"), RELAY))
        secret.write_text(PASSWORD + "\n")
        s.reload()
        r = send_until(s, "gen.example", signed)
        assert verify(r.message, mailcow_dns(seeded)) == [True]
        metric_until(s, "dkim_sidecar_redis_up", 1)


def test_password_file_gone_at_sighup_keeps_keys_and_counts_them(
    tmp_path: Path, server: RedisServer, seeded: redis.Redis
) -> None:
    """The reverse: the secret disappears (a botched redeploy), then SIGHUP. The source cannot
    even be built, its last keys keep signing, and the metrics say both: Redis not read, and
    the keys still counted under redis (not as 0, which would page someone for no reason)."""
    secret = tmp_path / "secrets" / "redispass"
    secret.parent.mkdir()
    secret.write_text(PASSWORD + "\n")
    config = sidecar_config(server.port, password_file=str(secret))
    with running(tmp_path / "sidecar", config, {}) as s:
        loaded = s.metric("dkim_sidecar_keys_loaded", source="redis")
        assert loaded >= 1
        secret.unlink()
        s.reload()
        s.wait_log("key source unusable")
        line = next(x for x in s.log().splitlines() if "key source unusable" in x)
        assert f"{secret} does not exist" in line
        r = s.send(msg("gen.example"), RELAY)
        assert verify(r.message, mailcow_dns(seeded)) == [True]
        assert s.metric("dkim_sidecar_redis_up") == 0
        assert s.metric("dkim_sidecar_keys_loaded", source="redis") == loaded


def test_ready_metric_agrees_with_readyz_when_redis_refuses(
    tmp_path: Path, server: RedisServer, seeded: redis.Redis
) -> None:
    config = sidecar_config(server.port)
    with running(tmp_path, config, {"REDISPASS": WRONG_PASSWORD}, wait_ready=False) as s:
        s.wait_log("authentication failed", timeout=POLL)
        assert s.http("/readyz")[0] == 503
        assert s.metric("dkim_sidecar_ready") == 0


def test_redis_killed_mid_run_then_back(tmp_path: Path, keys: Keys) -> None:
    """Cached keys keep signing while Redis is gone; the refresh resumes when it is back."""
    # AOF with fsync on every write: a SIGKILLed Redis comes back with its data, as Mailcow's
    # does (its redis keeps its data on a volume)
    with RedisServer(
        password=PASSWORD, extra_config=("appendonly yes", "appendfsync always")
    ) as srv:
        admin = srv.client()
        try:
            keys.gen.seed(admin)
            dns = mailcow_dns(admin)
            config = sidecar_config(srv.port, timeout=5)
            with running(tmp_path, config, {"REDISPASS": PASSWORD}) as s:
                assert verify(s.send(msg("gen.example"), RELAY).message, dns) == [True]
                assert s.metric("dkim_sidecar_redis_up") == 1

                srv.kill()  # SIGKILL: connections reset, no goodbye
                metric_until(s, "dkim_sidecar_redis_up", 0)
                s.wait_log("key source unreachable, keeping its last keys")
                line = next(x for x in s.log().splitlines() if "keeping its last keys" in x)
                assert "kept=1" in line and f"127.0.0.1:{srv.port}" in line
                for _ in range(3):  # across several failed refreshes
                    r = s.send(msg("gen.example"), RELAY)
                    assert verify(r.message, dns) == [True]
                    time.sleep(REFRESH)
                assert s.metric("dkim_sidecar_redis_up") == 0
                assert s.http("/readyz")[0] == 200  # it still signs: ready
                s.reload()  # a SIGHUP while Redis is gone keeps the cached keys too
                assert verify(s.send(msg("gen.example"), RELAY).message, dns) == [True]

                srv.start()  # same port, same data
                admin.close()
                admin = srv.client()
                assert admin.hget("DKIM_SELECTORS", "gen.example") == b"dkim"
                added = keys.spare[2]
                added.seed(admin)
                r = send_until(s, added.domain, signed)
                assert verify(r.message, mailcow_dns(admin)) == [True]
                metric_until(s, "dkim_sidecar_redis_up", 1)
                assert "key source answered" in s.log()
                assert verify(s.send(msg("gen.example"), RELAY).message, dns) == [True]
        finally:
            admin.close()


def connected(pid: int, port: int) -> bool:
    """Has process `pid` an established TCP connection to 127.0.0.1:`port`?"""
    mine = procfs.socket_inodes(pid)
    return any(
        t.state == "01" and t.remote == ("127.0.0.1", port) and t.inode in mine
        for t in procfs.tcp_sockets()
    )


@pytest.mark.parametrize("trouble", ["down", "frozen"])
def test_redis_unavailable_at_start(tmp_path: Path, keys: Keys, trouble: str) -> None:
    """The milter listens and passes mail unsigned while Redis cannot answer; it signs once
    Redis answers.

    down: nothing listens on the port (connection refused at once);
    frozen: a Redis that accepts connections but never answers (SIGSTOP). The sidecar's Redis
    timeout is an hour and its first key load is seen blocked on Redis: a milter that waited
    for that load before listening, or a message that waited for Redis, would not be answered
    before Redis is thawed.
    """
    srv = RedisServer(password=PASSWORD)
    srv.port = free_port("127.0.0.1")
    admin: redis.Redis | None = None
    try:
        if trouble == "frozen":
            srv.start()
            admin = srv.client()
            keys.gen.seed(admin)
            srv.freeze()
        config = sidecar_config(srv.port, timeout=3600)
        with running(tmp_path, config, {"REDISPASS": PASSWORD}, wait_ready=False) as s:
            assert s.proc is not None
            # first the evidence that the key load was tried (the gauge and /readyz start at
            # "not up", so without it the checks below would hold before any load)
            if trouble == "frozen":
                wait_for(lambda: connected(s.proc.pid, srv.port), POLL, "a connection to Redis")
            else:
                wait_for(
                    lambda: s.metric("dkim_sidecar_key_refreshes_total", result="partial") >= 1,
                    POLL,
                    "a failed key load",
                )
                line = next(x for x in s.log().splitlines() if "key source unreachable" in x)
                assert f"redis 127.0.0.1:{srv.port}: cannot connect" in line, line
            assert s.http("/healthz")[0] == 200
            assert s.http("/readyz")[0] == 503
            assert unsigned_no_key(s.send(msg("gen.example"), RELAY))
            assert s.metric("dkim_sidecar_redis_up") == 0
            # all of this was answered while Redis could not answer
            if trouble == "frozen":
                assert srv.pid is not None and procfs.stopped(srv.pid)
                srv.thaw()
            else:
                assert not srv.running
                srv.start()
                admin = srv.client()
                keys.gen.seed(admin)
            assert admin is not None
            r = send_until(s, "gen.example", signed)
            assert verify(r.message, mailcow_dns(admin)) == [True]
            wait_for(lambda: s.http("/readyz")[0] == 200, POLL, "/readyz")
            metric_until(s, "dkim_sidecar_redis_up", 1)
    finally:
        if admin is not None:
            admin.close()
        srv.close()


# -- relay networks that Mailcow's rspamd would reject ---------------------------------------------


def test_relay_networks_outside_forwarding_hosts_are_named_and_counted(
    tmp_path: Path, keys: Keys
) -> None:
    """A relay network that is no Mailcow forwarding host gets its mail rejected by rspamd
    (SPOOFED_UNAUTH) before the sidecar is asked: the log, check-config and a metric say so,
    and stop saying so once the admin adds it. A forwarding host typed as a name counts too:
    rspamd whitelists every network in the hash."""
    from harness.redis import seed_forwarding_host, seed_forwarding_name

    with RedisServer(password=PASSWORD) as srv:
        admin = srv.client()
        keys.gen.seed(admin)
        seed_forwarding_host(admin, "192.0.2.0/24", keep_spam=True)
        seed_forwarding_name(admin, "relay.example.net", ["203.0.113.0/25"], keep_spam=False)
        config = sidecar_config(srv.port)
        config["relay_networks"] = [
            "192.0.2.16/28",  # inside a forwarding host
            "198.51.100.7/32",  # in no forwarding host
            "203.0.113.64/26",  # inside the networks Mailcow expanded from a name
            "2001:db8:7::/48",  # in no forwarding host
            "127.0.0.1/32",  # Postfix's own container: never an rspamd client
        ]
        name = "dkim_sidecar_relay_networks_outside_forwarding_hosts"
        with running(tmp_path / "s", config, {"REDISPASS": PASSWORD}) as s:
            metric_until(s, name, 2)
            s.wait_log("relay network 198.51.100.7/32 is not a Mailcow forwarding host")
            s.wait_log("relay network 2001:db8:7::/48 is not a Mailcow forwarding host")
            assert "192.0.2.16/28 is not" not in s.log() and "203.0.113.64/26 is not" not in s.log()
            p = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dkim_sidecar.cli",
                    "check-config",
                    "--config",
                    str(s.config_path),
                ],
                capture_output=True,
                text=True,
                env=clean_env(REDISPASS=PASSWORD),
                timeout=60,
                check=False,
            )
            warned = [x for x in p.stderr.splitlines() if "not a Mailcow forwarding host" in x]
            assert len(warned) == 2 and "rspamd will reject" in warned[0], p.stderr
            seed_forwarding_host(admin, "198.51.100.7", keep_spam=False)
            seed_forwarding_host(admin, "2001:db8::/32", keep_spam=False)
            metric_until(s, name, 0)
        admin.close()
