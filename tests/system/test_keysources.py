"""Key sources: one suite over every backend (directory, table, Mailcow's Redis), then what
only Redis has (outages, credentials, read-only access, published keys, forwarding hosts).

Redis is a real redis-server (tests/harness/redis.py), seeded the way Mailcow's PHP writes it.
"""

from __future__ import annotations

import base64
import itertools
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dkim_sidecar import runtime
from dkim_sidecar.config import parse_config
from dkim_sidecar.dkim.canon import Canonicalization
from dkim_sidecar.dkim.header import split_message
from dkim_sidecar.dkim.keys import Algorithm, SigningKey
from dkim_sidecar.dkim.signer import MessageSigner, SigningPolicy
from dkim_sidecar.keysources.files import PasswordError, read_password
from dkim_sidecar.keysources.local import (
    MAX_KEY_FILE,
    DirectoryKeySource,
    KeySet,
    KeySource,
    SourceResult,
    SourceUnavailable,
    TableKeySource,
)
from dkim_sidecar.keysources.mailcow import NetworksFrom, RedisKeySource
from dkim_sidecar.keysources.specs import RedisSource
from harness import procfs
from harness.paths import VECTORS
from harness.redis import (
    RedisServer,
    free_port,
    mailcow_pub_b64,
    seed_ed25519,
    seed_forwarding_host,
    seed_forwarding_name,
    seed_mailcow,
)
from harness.threads import call_in_thread

ED_PREFIX = "DKIM_ED25519_"

# 512 bits: too small to sign with (RFC 8301); made once with `openssl genrsa 512`.
RSA_512_PEM = (VECTORS / "rsa512_too_small.pem").read_bytes()

GARBAGE_BODY = b"bm90IGEga2V5IGF0IGFsbA"
GARBAGE_PEM = b"-----BEGIN PRIVATE KEY-----\n" + GARBAGE_BODY + b"\n-----END PRIVATE KEY-----\n"


# -- test keys (generated once per session: RSA generation is the slow part) --------------------


@dataclass(frozen=True)
class Keys:
    rsa_a: rsa.RSAPrivateKey  # 1024
    rsa_b: rsa.RSAPrivateKey  # 1024
    rsa_big: rsa.RSAPrivateKey  # 2048
    ed: ed25519.Ed25519PrivateKey

    @staticmethod
    def pkcs8(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @staticmethod
    def pkcs1(key: rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    @property
    def ed_seed_b64(self) -> bytes:
        raw = self.ed.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(raw)


def spki_b64(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def ed_raw_b64(key: ed25519.Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        rsa_a=rsa.generate_private_key(public_exponent=65537, key_size=1024),
        rsa_b=rsa.generate_private_key(public_exponent=65537, key_size=1024),
        rsa_big=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed=ed25519.Ed25519PrivateKey.generate(),
    )


# -- Redis servers ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server for the tests that only read and write data (flushed before each)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    client.execute_command("ACL", "LOG", "RESET")
    yield client
    client.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of its own, for tests that kill, freeze or restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def sources() -> Iterator[list[RedisKeySource]]:
    """Redis sources made by a test, closed afterwards."""
    made: list[RedisKeySource] = []
    yield made
    for source in made:
        source.close()


def redis_source(
    server: RedisServer,
    made: list[RedisKeySource],
    *,
    password: str | object | None = "server's",
    networks_from: NetworksFrom | None = None,
    **spec: object,
) -> RedisKeySource:
    """A source for this Redis: `spec` as the config would validate it (timeout 2 s), with the
    server's password unless another (or None: no password) is given."""
    options: dict[str, object] = {"host": server.host, "port": server.port, "timeout": 2.0}
    options.update(spec)
    source = RedisKeySource(
        RedisSource(**options),  # type: ignore[arg-type]
        server.password if password == "server's" else password,  # type: ignore[arg-type]
        networks_from,
    )
    made.append(source)
    return source


def _is_ed25519(data: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        try:
            return len(base64.b64decode(data, validate=True)) == 32
        except ValueError:
            return False
    return isinstance(key, ed25519.Ed25519PrivateKey)


def _mailcow_pub_or_empty(pem: bytes) -> str:
    try:
        return mailcow_pub_b64(pem)
    except ValueError:
        return ""  # garbage: there is no public half to publish


# -- the backend fixture: same entries, every backend ------------------------------------------


@dataclass(frozen=True)
class TableRow:
    """What TableKeySource reads from each configured entry."""

    domain: str
    selector: str
    key_file: str


Entry = tuple[str, str, bytes]  # domain, selector, key bytes
MakeSource = Callable[[Sequence[Entry]], KeySource]


@pytest.fixture(params=["directory", "table", "redis"])
def make_source(
    request: pytest.FixtureRequest, tmp_path: Path, sources: list[RedisKeySource]
) -> MakeSource:
    """Put (domain, selector, key) entries into one backend and return a KeySource for them.

    Each call makes a new, independent source (a new directory, a new Redis db), so a test can
    build two and combine them.
    """
    counter = itertools.count()
    backend: str = request.param

    def directory(entries: Sequence[Entry]) -> KeySource:
        d = tmp_path / f"keys{next(counter)}"
        d.mkdir()
        for domain, selector, data in entries:
            (d / f"{domain}.{selector}.key").write_bytes(data)
        return DirectoryKeySource(str(d))

    def table(entries: Sequence[Entry]) -> KeySource:
        d = tmp_path / f"table{next(counter)}"
        d.mkdir()
        rows = []
        for i, (domain, selector, data) in enumerate(entries):
            path = d / f"{i}.pem"
            path.write_bytes(data)
            rows.append(TableRow(domain, selector, str(path)))
        return TableKeySource(rows)

    def in_redis(entries: Sequence[Entry]) -> KeySource:
        server: RedisServer = request.getfixturevalue("redis_server")
        db = next(counter)
        client = server.client(db=db)
        client.flushdb()
        for domain, selector, data in entries:
            if _is_ed25519(data):
                seed_ed25519(client, domain, selector, data, ED_PREFIX)
            else:
                seed_mailcow(client, domain, selector, data, _mailcow_pub_or_empty(data))
        client.close()
        return redis_source(server, sources, db=db, ed25519_key_prefix=ED_PREFIX)

    return {"directory": directory, "table": table, "redis": in_redis}[backend]


def by_domain(result: SourceResult) -> dict[str, list[SigningKey]]:
    out: dict[str, list[SigningKey]] = {}
    for key in result.keys:
        out.setdefault(key.domain, []).append(key)
    return out


# -- the suite every backend passes --------------------------------------------------------------


def test_keys_load_with_selector_algorithm_and_bits(make_source: MakeSource, keys: Keys) -> None:
    source = make_source(
        [
            ("example.org", "dkim", Keys.pkcs8(keys.rsa_a)),
            ("example.net", "big2048", Keys.pkcs8(keys.rsa_big)),
            ("example.com", "ed1", Keys.pkcs8(keys.ed)),
        ]
    )
    result = source.load()
    assert result.problems == ()
    found = {k.domain: k for k in result.keys}
    assert set(found) == {"example.org", "example.net", "example.com"}
    assert (found["example.org"].selector, found["example.org"].bits) == ("dkim", 1024)
    assert found["example.org"].algorithm is Algorithm.RSA_SHA256
    assert (found["example.net"].selector, found["example.net"].bits) == ("big2048", 2048)
    assert found["example.com"].selector == "ed1"
    assert found["example.com"].algorithm is Algorithm.ED25519_SHA256
    assert found["example.org"].public_key_b64() == spki_b64(keys.rsa_a)


def test_pkcs8_pkcs1_and_ed25519_formats(make_source: MakeSource, keys: Keys) -> None:
    pkcs8 = Keys.pkcs8(keys.rsa_a)
    pkcs1 = Keys.pkcs1(keys.rsa_b)
    assert pkcs8.startswith(b"-----BEGIN PRIVATE KEY-----\n") and b"\r" not in pkcs8
    assert pkcs1.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n") and b"\r" not in pkcs1
    source = make_source(
        [
            ("pkcs8.example", "s1", pkcs8),
            ("pkcs1.example", "s1", pkcs1),
            ("edpem.example", "s1", Keys.pkcs8(keys.ed)),
            ("edseed.example", "s1", keys.ed_seed_b64),
        ]
    )
    result = source.load()
    assert result.problems == ()
    found = {k.domain: k for k in result.keys}
    assert found["pkcs8.example"].public_key_b64() == spki_b64(keys.rsa_a)
    assert found["pkcs1.example"].public_key_b64() == spki_b64(keys.rsa_b)
    assert found["edpem.example"].public_key_b64() == ed_raw_b64(keys.ed)
    assert found["edseed.example"].public_key_b64() == ed_raw_b64(keys.ed)


def test_garbage_for_one_domain_leaves_the_others(make_source: MakeSource, keys: Keys) -> None:
    source = make_source(
        [
            ("good.example", "dkim", Keys.pkcs8(keys.rsa_a)),
            ("broken.example", "sel7", GARBAGE_PEM),
            ("also-good.example", "dkim", Keys.pkcs1(keys.rsa_b)),
        ]
    )
    result = source.load()
    assert sorted(by_domain(result)) == ["also-good.example", "good.example"]
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert "broken.example" in problem and "sel7" in problem
    assert GARBAGE_BODY.decode() not in problem


def test_key_files_that_are_not_files(tmp_path: Path, keys: Keys) -> None:
    """A FIFO named like a key (it would block the refresh forever), a socket, /dev/zero as a
    table key (it would never end), a directory, a key file past the size limit: each is one
    problem line, read in bounded time, and the good key next to them loads."""
    d = tmp_path / "keys"
    d.mkdir()
    (d / "good.example.dkim.key").write_bytes(Keys.pkcs8(keys.rsa_a))
    os.mkfifo(d / "fifo.example.sel.key")
    (d / "dir.example.sel.key").mkdir()
    (d / "big.example.sel.key").write_bytes(b"x" * (MAX_KEY_FILE + 1))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock.example.sel.key"))
    # in a thread: a regression would block on the FIFO, and must fail here, not hang the suite
    done: list[SourceResult] = []
    worker = threading.Thread(target=lambda: done.append(DirectoryKeySource(str(d)).load()))
    worker.daemon = True
    worker.start()
    worker.join(10)
    sock.close()
    assert done, "loading the key directory blocked"
    result = done[0]
    assert sorted(by_domain(result)) == ["good.example"]
    problems = sorted(result.problems)
    assert len(problems) == 4
    assert "big.example.sel.key: " in problems[0] and "too large to be a key" in problems[0]
    assert "dir.example.sel.key: " in problems[1] and "not a regular file" in problems[1]
    assert "fifo.example.sel.key: " in problems[2] and "not a regular file" in problems[2]
    assert "sock.example.sel.key: " in problems[3] and "not a regular file" in problems[3]
    table = TableKeySource([TableRow("zero.example", "sel", "/dev/zero")]).load()
    assert table.keys == () and len(table.problems) == 1
    assert table.problems[0].startswith("/dev/zero: ") and "not a regular file" in table.problems[0]


def test_rsa_512_is_refused(make_source: MakeSource, keys: Keys) -> None:
    source = make_source(
        [("small.example", "tiny", RSA_512_PEM), ("ok.example", "dkim", Keys.pkcs8(keys.rsa_a))]
    )
    result = source.load()
    assert [k.domain for k in result.keys] == ["ok.example"]
    assert len(result.problems) == 1
    assert "small.example" in result.problems[0] and "tiny" in result.problems[0]
    assert "512 bits" in result.problems[0]


def test_combine_first_source_wins_per_domain(make_source: MakeSource, keys: Keys) -> None:
    first = make_source(
        [
            ("shared.example", "first", Keys.pkcs8(keys.rsa_a)),
            ("only-first.example", "dkim", Keys.pkcs8(keys.rsa_a)),
        ]
    )
    second = make_source(
        [
            ("shared.example", "second", Keys.pkcs8(keys.rsa_b)),
            ("shared.example", "second-ed", Keys.pkcs8(keys.ed)),
            ("only-second.example", "dkim", Keys.pkcs8(keys.rsa_b)),
        ]
    )
    keyset = KeySet.combine([first.load(), second.load()])
    assert [k.selector for k in keyset.by_domain["shared.example"]] == ["first"]
    assert keyset.by_domain["only-first.example"][0].selector == "dkim"
    assert keyset.by_domain["only-second.example"][0].public_key_b64() == spki_b64(keys.rsa_b)
    # the other order: the second source's keys (RSA first, then Ed25519) win
    keyset = KeySet.combine([second.load(), first.load()])
    shared = keyset.by_domain["shared.example"]
    assert [(k.selector, k.algorithm) for k in shared] == [
        ("second", Algorithm.RSA_SHA256),
        ("second-ed", Algorithm.ED25519_SHA256),
    ]
    assert len(keyset) == 4


def test_parent_lookup(make_source: MakeSource, keys: Keys) -> None:
    source = make_source(
        [("example.org", "dkim", Keys.pkcs8(keys.rsa_a)), ("org", "tld", Keys.pkcs8(keys.rsa_b))]
    )
    keyset = KeySet.combine([source.load()])
    assert keyset.lookup("mail.example.org") == ("", ())
    domain, found = keyset.lookup("mail.example.org", parent_fallback=True)
    assert domain == "example.org" and [k.selector for k in found] == ["dkim"]
    domain, found = keyset.lookup("a.b.example.org", parent_fallback=True)
    assert domain == "example.org"
    # never a bare TLD, even when a key for one exists
    assert keyset.lookup("example.net", parent_fallback=True) == ("", ())


# -- Redis only: data layout ----------------------------------------------------------------


def test_redis_every_key_signs_and_dkimpy_verifies(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource], keys: Keys
) -> None:
    seed_mailcow(admin, "pkcs8.example", "dkim", Keys.pkcs8(keys.rsa_a), "")
    seed_mailcow(admin, "pkcs1.example", "s2024", Keys.pkcs1(keys.rsa_b), "")
    seed_mailcow(admin, "big.example", "dkim", Keys.pkcs8(keys.rsa_big), "")
    for domain, pem in (
        ("pkcs8.example", Keys.pkcs8(keys.rsa_a)),
        ("pkcs1.example", Keys.pkcs1(keys.rsa_b)),
        ("big.example", Keys.pkcs8(keys.rsa_big)),
    ):
        admin.hset("DKIM_PUB_KEYS", domain, mailcow_pub_b64(pem))
    seed_ed25519(admin, "big.example", "ed", keys.ed_seed_b64, ED_PREFIX)  # dual signing

    result = redis_source(redis_server, sources, ed25519_key_prefix=ED_PREFIX).load()
    assert result.problems == ()
    assert len(result.keys) == 4
    keyset = KeySet.combine([result])

    # DNS as the admin publishes it: p= straight from DKIM_PUB_KEYS (read here, not by the
    # source), and for Ed25519 the raw public key
    dns: dict[bytes, bytes] = {}
    for domain_b, selector_b in admin.hgetall("DKIM_SELECTORS").items():
        pub = admin.hget("DKIM_PUB_KEYS", domain_b)
        name = selector_b + b"._domainkey." + domain_b + b"."
        dns[name] = b"v=DKIM1; k=rsa; p=" + pub
    dns[b"ed._domainkey.big.example."] = b"v=DKIM1; k=ed25519; p=" + ed_raw_b64(keys.ed).encode()

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
        return dns[name.encode() if isinstance(name, str) else name]

    policy = SigningPolicy(
        Canonicalization.parse("relaxed/relaxed"),
        ("from", "to", "subject", "date", "message-id"),
        frozenset({"from", "subject"}),
    )
    signed_count = 0
    for domain, domain_keys in keyset.by_domain.items():
        message = (
            f"From: Printer <scan@{domain}>\r\n"
            "To: someone@example.net\r\n"
            "Subject:  a scan \r\n"
            "Date: Thu, 27 Nov 2025 10:00:00 +0000\r\n"
            f"Message-ID: <1@{domain}>\r\n"
            "\r\n"
            "Hello,\r\n\r\nthe scan is attached.  \r\n\r\n\r\n"
        ).encode()
        fields, body = split_message(message)
        signer = MessageSigner(domain_keys, policy, now=int(time.time()))
        signer.update(body)
        signed = b"".join(signer.sign(fields)) + message
        verifier = dkim.DKIM(signed, minkey=1024)
        for idx in range(len(domain_keys)):
            assert verifier.verify(idx=idx, dnsfunc=dnsfunc), (domain, idx)
            signed_count += 1
    assert signed_count == 4


def test_redis_pub_key_mismatch_is_reported_and_key_still_used(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource], keys: Keys
) -> None:
    # mid-rotation: the new private key is in, DKIM_PUB_KEYS still shows the old one
    seed_mailcow(admin, "example.org", "dkim", Keys.pkcs8(keys.rsa_a), spki_b64(keys.rsa_b))
    seed_mailcow(admin, "fine.example", "dkim", Keys.pkcs8(keys.rsa_b), spki_b64(keys.rsa_b))
    result = redis_source(redis_server, sources).load()
    assert sorted(k.domain for k in result.keys) == ["example.org", "fine.example"]
    used = next(k for k in result.keys if k.domain == "example.org")
    assert used.public_key_b64() == spki_b64(keys.rsa_a)
    assert len(result.problems) == 1
    assert (
        "published DKIM_PUB_KEYS for example.org does not match the private key of "
        "dkim.example.org" in result.problems[0]
    )


def test_redis_pub_key_with_line_breaks_still_matches(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource], keys: Keys
) -> None:
    pub = spki_b64(keys.rsa_a)
    wrapped = "\n".join(pub[i : i + 64] for i in range(0, len(pub), 64))
    seed_mailcow(admin, "example.org", "dkim", Keys.pkcs8(keys.rsa_a), wrapped)
    assert redis_source(redis_server, sources).load().problems == ()


def test_redis_inconsistent_hashes(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource], keys: Keys
) -> None:
    # a selector without its private key, and a key without its DKIM_PUB_KEYS entry
    admin.hset("DKIM_SELECTORS", "nokey.example", "dkim")
    seed_mailcow(admin, "nopub.example", "dkim", Keys.pkcs8(keys.rsa_a), "")
    admin.hdel("DKIM_PUB_KEYS", "nopub.example")
    # a private key no selector points at (stale): not used, not a problem
    admin.hset("DKIM_PRIV_KEYS", "old.nopub.example", Keys.pkcs8(keys.rsa_b))
    result = redis_source(redis_server, sources).load()
    assert [(k.domain, k.selector) for k in result.keys] == [("nopub.example", "dkim")]
    assert len(result.problems) == 2
    assert any("nokey.example" in p and "dkim.nokey.example" in p for p in result.problems)
    assert any("DKIM_PUB_KEYS has no entry for nopub.example" in p for p in result.problems)


def test_redis_ed25519_hash_rules(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource], keys: Keys
) -> None:
    seed_mailcow(admin, "same.example", "dkim", Keys.pkcs8(keys.rsa_a), spki_b64(keys.rsa_a))
    seed_ed25519(admin, "same.example", "dkim", keys.ed_seed_b64, ED_PREFIX)
    seed_ed25519(admin, "rsa-in-ed.example", "ed", Keys.pkcs8(keys.rsa_b), ED_PREFIX)
    admin.hset(ED_PREFIX + "SELECTORS", "missing.example", "ed")
    result = redis_source(redis_server, sources, ed25519_key_prefix=ED_PREFIX).load()
    assert [(k.domain, k.algorithm) for k in result.keys] == [
        ("same.example", Algorithm.RSA_SHA256)
    ]
    text = "\n".join(result.problems)
    assert "same.example uses selector dkim for both" in text
    assert "ed.rsa-in-ed.example holds an rsa key" in text
    assert "DKIM_ED25519_PRIV_KEYS has no ed.missing.example" in text
    # without the prefix the Ed25519 hashes are not read at all
    assert redis_source(redis_server, sources).load().problems == ()


def test_redis_wrong_type_is_unavailable(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource]
) -> None:
    admin.set("DKIM_SELECTORS", "not a hash")
    with pytest.raises(SourceUnavailable, match="WRONGTYPE"):
        redis_source(redis_server, sources).load()


def test_redis_empty_keyspace(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource]
) -> None:
    source = redis_source(
        redis_server, sources, ed25519_key_prefix=ED_PREFIX, networks_from="keep_spam"
    )
    assert source.load() == SourceResult(forwarding_hosts=())  # read, and empty


# -- Redis only: forwarding hosts as relay networks ---------------------------------------------


def _seed_forwarding_hosts(admin: redis.Redis) -> None:
    seed_forwarding_host(admin, "192.0.2.10", keep_spam=True)
    seed_forwarding_host(admin, "198.51.100.0/24", keep_spam=False)
    seed_forwarding_host(admin, "2001:db8::/48", keep_spam=True)
    seed_forwarding_host(admin, "2001:db8:1::5", keep_spam=False)
    seed_forwarding_host(admin, "203.0.113.7/24", keep_spam=True)
    seed_forwarding_host(admin, "relay.example.net", keep_spam=True)
    admin.hset("KEEP_SPAM", "192.0.2.99", "1")  # orphan: not a forwarding host
    admin.hset("KEEP_SPAM", "198.51.100.0/24", "0")  # not "1": the spam filter is on


def test_redis_networks_from_forwarding_hosts(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource]
) -> None:
    _seed_forwarding_hosts(admin)
    result = redis_source(redis_server, sources, networks_from="forwarding_hosts").load()
    assert [str(n) for n in result.networks] == [
        "192.0.2.10/32",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "2001:db8::/48",
        "2001:db8:1::5/128",
    ]
    assert len(result.problems) == 2
    assert any("'relay.example.net' is not an IP address" in p for p in result.problems)
    assert any("'203.0.113.7/24' has host bits set" in p for p in result.problems)


def test_redis_networks_from_keep_spam(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource]
) -> None:
    _seed_forwarding_hosts(admin)
    result = redis_source(redis_server, sources, networks_from="keep_spam").load()
    assert [str(n) for n in result.networks] == ["192.0.2.10/32", "203.0.113.0/24", "2001:db8::/48"]
    assert len(result.problems) == 3
    assert any("'relay.example.net' is not an IP address" in p for p in result.problems)
    assert any("'203.0.113.7/24' has host bits set" in p for p in result.problems)
    assert any("'192.0.2.99' is not a forwarding host" in p for p in result.problems)


# What Mailcow's UI stores when the admin types "gmail.com" as a forwarding host: that domain's
# outgoing networks from its SPF record (documentation ranges stand in for Google's here).
EXPANDED_V4 = ["192.0.2.0/25", "198.51.100.0/24"]
EXPANDED_V6 = ["2001:db8:4860::/48"]


@pytest.mark.parametrize("networks_from", ["forwarding_hosts", "keep_spam"])
def test_redis_forwarding_hosts_typed_as_a_name_are_never_relay_networks(
    redis_server: RedisServer,
    admin: redis.Redis,
    sources: list[RedisKeySource],
    networks_from: NetworksFrom,
) -> None:
    """Typing a domain expands it into someone else's networks: any user of that provider
    could then have mail signed as ours. Only entries typed as the network itself count."""
    seed_forwarding_name(admin, "gmail.com", EXPANDED_V4 + EXPANDED_V6, keep_spam=True)
    seed_forwarding_name(admin, "relay.example.net", ["203.0.113.64/26"], keep_spam=True)
    seed_forwarding_host(admin, "203.0.113.9", keep_spam=True)  # typed as an address
    seed_forwarding_host(admin, "2001:db8:9::/64", keep_spam=True)  # typed as a network
    admin.hset("WHITELISTED_FWD_HOST", "192.0.2.200", " 192.0.2.200 ")  # Mailcow trims the key
    admin.hset("KEEP_SPAM", "192.0.2.200", "1")
    result = redis_source(redis_server, sources, networks_from=networks_from).load()
    assert [str(n) for n in result.networks] == [
        "192.0.2.200/32",
        "203.0.113.9/32",
        "2001:db8:9::/64",
    ]
    # one problem per name typed, naming every network skipped for it
    assert len(result.problems) == 2, result.problems
    gmail = next(p for p in result.problems if "'gmail.com'" in p)
    for network in EXPANDED_V4 + EXPANDED_V6:
        assert network in gmail
    assert "expanded by Mailcow from the host name" in gmail and "skipped" in gmail
    assert any("'relay.example.net'" in p and "203.0.113.64/26" in p for p in result.problems)


def test_redis_networks_off_by_default(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource]
) -> None:
    _seed_forwarding_hosts(admin)
    result = redis_source(redis_server, sources).load()
    assert result.networks == () and result.problems == ()


# -- Redis only: read-only ------------------------------------------------------------------


def test_redis_needs_only_read_commands(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource], keys: Keys
) -> None:
    """Everything loads as an ACL user limited to +@read, and that user never even tried
    anything else: the ACL LOG, where Redis records each refused command, stays empty."""
    seed_mailcow(admin, "example.org", "dkim", Keys.pkcs8(keys.rsa_a), spki_b64(keys.rsa_a))
    seed_ed25519(admin, "example.org", "ed", keys.ed_seed_b64, ED_PREFIX)
    _seed_forwarding_hosts(admin)
    admin.acl_setuser(
        "sidecar",
        enabled=True,
        reset=True,
        passwords=["+sidecar-read-only"],
        keys=["*"],
        commands=["-@all", "+@read"],
    )
    before = {k: admin.dump(k) for k in admin.keys("*")}
    source = redis_source(
        redis_server,
        sources,
        username="sidecar",
        password="sidecar-read-only",
        ed25519_key_prefix=ED_PREFIX,
        networks_from="forwarding_hosts",
    )
    result = source.load()
    assert len(result.keys) == 2 and len(result.networks) == 5
    source.load()  # again, over the pooled connection
    assert admin.acl_log() == []
    assert {k: admin.dump(k) for k in admin.keys("*")} == before
    # the ACL does bite: the same user cannot write
    writer = redis_server.client(username="sidecar", password="sidecar-read-only")
    with pytest.raises(redis.exceptions.NoPermissionError):
        writer.hset("DKIM_SELECTORS", "evil.example", "x")
    writer.close()
    admin.execute_command("ACL", "LOG", "RESET")  # that refusal was logged, of course

    # the least privilege the module's docstring recommends is enough too
    admin.execute_command(
        "ACL SETUSER dkim-sidecar reset on >least-privilege -@all +hgetall +hmget "
        "~DKIM_* ~WHITELISTED_FWD_HOST ~KEEP_SPAM"
    )
    least = redis_source(
        redis_server,
        sources,
        username="dkim-sidecar",
        password="least-privilege",
        ed25519_key_prefix=ED_PREFIX,
        networks_from="keep_spam",
    )
    assert len(least.load().keys) == 2
    assert admin.acl_log() == []


def test_redis_username_from_the_config(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource], keys: Keys
) -> None:
    """`keys.redis.username` as an admin writes it: the sidecar logs in as that ACL user (the
    docstring's least-privilege one) and loads the keys; a user Redis does not know is named
    in the error, the password is not."""
    seed_mailcow(admin, "example.org", "dkim", Keys.pkcs8(keys.rsa_a), spki_b64(keys.rsa_a))
    admin.execute_command(
        "ACL SETUSER dkim-sidecar reset on >pw-for-the-acl-user -@all +hgetall +hmget "
        "~DKIM_* ~WHITELISTED_FWD_HOST ~KEEP_SPAM"
    )
    env = {"SIDECAR_REDIS_PASSWORD": "pw-for-the-acl-user"}

    def source_for(user: str, db: int = 0) -> RedisKeySource:
        raw = {
            "keys": {
                "redis": {
                    "host": redis_server.host,
                    "port": redis_server.port,
                    "db": db,
                    "username": user,
                    "password_env": "SIDECAR_REDIS_PASSWORD",
                }
            }
        }
        config = parse_config(raw, "config.yml", env)
        assert config.keys.redis is not None and config.keys.redis.username == user
        made = runtime.make_source(config.keys.redis, config, env)
        assert isinstance(made, RedisKeySource)
        sources.append(made)
        return made

    loaded = source_for("dkim-sidecar").load()
    assert [(k.domain, k.selector) for k in loaded.keys] == [("example.org", "dkim")]
    assert admin.acl_log() == []  # it sent nothing that user may not
    # another db needs SELECT, as the docs say: refused without it, enough with it
    other = redis_server.client(db=3)
    seed_mailcow(other, "example.net", "db3", Keys.pkcs8(keys.rsa_b), spki_b64(keys.rsa_b))
    other.close()
    with pytest.raises(SourceUnavailable, match=r"permission denied.*select"):
        source_for("dkim-sidecar", db=3).load()
    admin.execute_command("ACL SETUSER dkim-sidecar +select")
    admin.execute_command("ACL LOG RESET")
    loaded = source_for("dkim-sidecar", db=3).load()
    assert [(k.domain, k.selector) for k in loaded.keys] == [("example.net", "db3")]
    assert admin.acl_log() == []
    with pytest.raises(SourceUnavailable) as info:
        source_for("no-such-user").load()
    # Redis answers WRONGPASS for a user it does not have: the hint is about that user
    assert "user no-such-user: authentication failed" in str(info.value)
    assert "ACL user exists" in str(info.value) and "REDISPASS" not in str(info.value)
    assert "pw-for-the-acl-user" not in _chain_text(info.value)


def test_redis_permission_denied_names_the_command(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource]
) -> None:
    admin.acl_setuser(
        "nothing", enabled=True, reset=True, passwords=["+pw-nothing"], commands=["-@all"]
    )
    source = redis_source(redis_server, sources, username="nothing", password="pw-nothing")
    with pytest.raises(SourceUnavailable) as info:
        source.load()
    assert "permission denied" in str(info.value) and "hgetall" in str(info.value)
    assert "pw-nothing" not in str(info.value)


# -- Redis only: credentials never leak ------------------------------------------------------


def _chain_text(exc: BaseException) -> str:
    """Everything an exception could show: str, repr, the formatted traceback, and the same for
    every exception in its __cause__/__context__ chain."""
    parts: list[str] = []
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        parts += [str(e), repr(e)]
        parts += traceback.format_exception(e)
        stack += [e.__cause__, e.__context__]
    return "\n".join(parts)


def test_redis_wrong_password(
    redis_server: RedisServer, sources: list[RedisKeySource], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Wr0ng-" + redis_server.password[::-1]
    source = redis_source(redis_server, sources, password=wrong)
    with pytest.raises(SourceUnavailable) as info:
        source.load()
    exc = info.value
    assert str(exc).startswith(f"redis {redis_server.address}: ")
    assert "authentication failed" in str(exc) and "REDISPASS" in str(exc)
    assert exc.__cause__ is None and exc.__context__ is None
    text = _chain_text(exc) + repr(source)
    assert wrong not in text and redis_server.password not in text
    for record in caplog.records:
        assert wrong not in record.getMessage() and wrong not in (record.exc_text or "")


def test_redis_no_password_configured(
    redis_server: RedisServer, sources: list[RedisKeySource]
) -> None:
    source = redis_source(redis_server, sources, password=None)
    with pytest.raises(SourceUnavailable, match="no password is configured"):
        source.load()


def test_redis_password_never_logged(
    redis_server: RedisServer,
    admin: redis.Redis,
    sources: list[RedisKeySource],
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seed_mailcow(admin, "example.org", "dkim", Keys.pkcs8(keys.rsa_a), spki_b64(keys.rsa_a))
    source = redis_source(redis_server, sources)
    result = source.load()
    assert len(result.keys) == 1
    assert redis_server.password not in repr(source)
    assert any("redis" in r.getMessage() for r in caplog.records)  # it did log something
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert redis_server.password not in text
        assert "PRIVATE KEY" not in text


# -- Redis only: outages ---------------------------------------------------------------------


def connections_to(port: int) -> set[int]:
    """The client ports of the TCP connections to 127.0.0.1:`port` the kernel knows of. A
    frozen Redis never accepts or closes one, so each new port is one connection attempt."""
    return {t.remote[1] for t in procfs.tcp_sockets() if t.local_port == port and t.state != "0A"}


def test_redis_killed_then_restarted(
    own_redis: RedisServer, sources: list[RedisKeySource], keys: Keys
) -> None:
    pem = Keys.pkcs8(keys.rsa_a)
    client = own_redis.client()
    seed_mailcow(client, "example.org", "dkim", pem, mailcow_pub_b64(pem))
    client.close()
    # generous: the loads after the restart must succeed on a loaded machine too
    source = redis_source(own_redis, sources, timeout=5.0)
    assert len(source.load().keys) == 1  # a pooled connection now exists

    own_redis.kill()
    with pytest.raises(SourceUnavailable, match="cannot connect") as info:
        call_in_thread(source.load)
    assert own_redis.address in str(info.value)
    assert own_redis.password not in _chain_text(info.value)

    own_redis.restart()  # same port, empty (no persistence): Mailcow's data comes back
    client = own_redis.client()
    seed_mailcow(client, "example.org", "dkim", pem, mailcow_pub_b64(pem))
    client.close()
    result = source.load()  # the same source, its pool reconnects
    assert [k.domain for k in result.keys] == ["example.org"]


def test_redis_hung_server_times_out(
    own_redis: RedisServer, sources: list[RedisKeySource], keys: Keys
) -> None:
    pem = Keys.pkcs8(keys.rsa_a)
    client = own_redis.client()
    seed_mailcow(client, "example.org", "dkim", pem, mailcow_pub_b64(pem))
    client.close()
    # generous: the loads before the freeze and after the thaw must succeed on a loaded machine
    # too; the frozen ones fail all the same, only later
    timeout = 5.0
    warm = redis_source(own_redis, sources, timeout=timeout)
    assert len(warm.load().keys) == 1
    cold = redis_source(own_redis, sources, timeout=timeout)
    own_redis.freeze()
    try:
        # over a pooled connection, and over a new one; the message says that the timeout
        # ended the load, and one connection at most says it was not tried again (a retry would
        # stretch the timeout into many)
        for source, connects in ((warm, 0), (cold, 1)):
            before = connections_to(own_redis.port)
            with pytest.raises(SourceUnavailable, match="no answer within 5 s"):
                call_in_thread(source.load)
            assert len(connections_to(own_redis.port) - before) == connects
    finally:
        own_redis.thaw()
    assert len(warm.load().keys) == 1


def test_redis_nothing_listening(sources: list[RedisKeySource]) -> None:
    port = free_port("127.0.0.1")
    source = RedisKeySource(RedisSource(host="127.0.0.1", port=port, timeout=1.0), "x")
    sources.append(source)
    with pytest.raises(SourceUnavailable, match=f"redis 127.0.0.1:{port}: cannot connect"):
        source.load()


def test_redis_source_construction_never_connects() -> None:
    source = RedisKeySource(RedisSource(host="redis-mailcow.invalid", timeout=0.2), "pw")
    assert source.name == "redis"
    assert repr(source) == "RedisKeySource(redis-mailcow.invalid:6379, db=0)"
    v6 = RedisKeySource(RedisSource(host="::1"))
    assert v6.address == "[::1]:6379"
    source.close()
    v6.close()


# -- read_password ---------------------------------------------------------------------------


SECRET = "s3cr3t-Pa55"


def test_read_password_from_env() -> None:
    assert read_password("REDISPASS", None, {"REDISPASS": SECRET}) == SECRET
    assert read_password("REDISPASS", None, {"REDISPASS": SECRET + "\n"}) == SECRET
    assert read_password(None, None, {"REDISPASS": SECRET}) is None


def test_read_password_file_wins(tmp_path: Path) -> None:
    path = tmp_path / "redispass"
    path.write_text(SECRET + "\n")
    assert read_password("REDISPASS", str(path), {"REDISPASS": "other"}) == SECRET
    path.write_text(SECRET + "\r\n")
    assert read_password(None, str(path), {}) == SECRET
    path.write_text(SECRET)
    assert read_password(None, str(path), {}) == SECRET


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (SECRET.encode() + b"\n\n", "holds more than one line"),
        (SECRET.encode() + b"\nsecond", "holds more than one line"),
        (b"\n", "is empty"),
        (b"", "is empty"),
        (b"\xff" + SECRET.encode(), "is not UTF-8 text"),
    ],
)
def test_read_password_bad_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "redispass"
    path.write_bytes(content)
    with pytest.raises(PasswordError, match=message) as info:
        read_password(None, str(path), {})
    assert str(path) in str(info.value)
    assert SECRET not in _chain_text(info.value) and "second" not in _chain_text(info.value)
    assert info.value.__context__ is None


def test_read_password_missing(tmp_path: Path) -> None:
    with pytest.raises(PasswordError, match=r"environment variable REDISPASS .* is not set"):
        read_password("REDISPASS", None, {})
    with pytest.raises(PasswordError, match="environment variable REDISPASS is empty"):
        read_password("REDISPASS", None, {"REDISPASS": ""})
    missing = tmp_path / "nope"
    with pytest.raises(PasswordError, match=f"{missing} does not exist"):
        read_password("REDISPASS", str(missing), {"REDISPASS": SECRET})
    with pytest.raises(PasswordError, match="is not a regular file"):
        read_password(None, str(tmp_path), {})
    with pytest.raises(PasswordError, match="/dev/zero is not a regular file"):
        read_password(None, "/dev/zero", {})  # would never end
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(PasswordError, match="fifo is not a regular file"):
        read_password(None, str(tmp_path / "fifo"), {})  # would wait for a writer forever


def test_redis_hash_holding_keys_where_names_belong_never_shows_a_key(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource], keys: Keys
) -> None:
    """selectors_hash pointed at the private-key hash by mistake: each "selector" read is a
    PEM (or, for Ed25519, a base64 seed). Every such entry is skipped, and no problem line
    (they go to the log and to `dkim-sidecar keys`) carries any line of the key."""
    pem = Keys.pkcs8(keys.rsa_a)
    seed = base64.b64encode(
        keys.ed.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    admin.hset("DKIM_PRIV_KEYS", mapping={"example.com": pem, "example.net": seed})
    result = redis_source(redis_server, sources, selectors_hash="DKIM_PRIV_KEYS").load()
    assert not result.keys
    assert len(result.problems) == 2
    text = "\n".join(result.problems)
    assert "cannot be a name" in text
    for line in [*pem.decode().splitlines(), seed.decode()]:
        assert line not in text


def test_redis_forwarding_host_wider_than_a_floor_is_never_a_relay_network(
    redis_server: RedisServer, admin: redis.Redis, sources: list[RedisKeySource]
) -> None:
    """A typo in a forwarding host's prefix length (/0, or host bits with /3) would make every
    client on the Internet a relay client: such entries are skipped, narrower ones kept."""
    for host in ("0.0.0.0/0", "203.0.113.5/0", "::/0", "192.0.2.1/7", "2000::/15"):
        seed_forwarding_host(admin, host, keep_spam=True)
    seed_forwarding_host(admin, "10.0.0.0/8", keep_spam=True)
    seed_forwarding_host(admin, "2001::/16", keep_spam=True)
    result = redis_source(redis_server, sources, networks_from="keep_spam").load()
    assert [str(n) for n in result.networks] == ["10.0.0.0/8", "2001::/16"]
    assert sum("not trusted to relay" in p for p in result.problems) == 5


def test_runtime_relay_check_takes_source_networks_as_the_config_takes_its_own() -> None:
    """Networks from a key source (Mailcow forwarding hosts) are matched exactly like the
    config's: an IPv4-mapped network matches its IPv4 clients too, and nothing else."""
    from ipaddress import ip_network

    from dkim_sidecar.config import Config
    from dkim_sidecar.runtime import Runtime

    found = (ip_network("::ffff:10.0.0.0/104"), ip_network("2001:db8:5::/48"))
    runtime = Runtime.build(Config(relay_networks=()), KeySet(networks=found))
    for inside in ("10.0.0.5", "::ffff:10.1.2.3", "2001:db8:5::25"):
        assert runtime.is_relay(inside), inside
    for outside in ("11.0.0.1", "::ffff:11.0.0.1", "2001:db8:6::1", "127.0.0.1", "bogus"):
        assert not runtime.is_relay(outside), outside
    assert Runtime.build(Config(relay_networks=found), KeySet()).is_relay("10.0.0.5")  # same rule


def test_a_redis_error_text_holding_the_password_is_withheld_whole() -> None:
    """Masked in place, a short password in a host name ("***-host") would give itself away:
    an error text that holds the password is replaced, not masked."""
    source = RedisKeySource(RedisSource(host="redis-host", timeout=0.2), "redis")
    try:
        text = source._describe(redis.ConnectionError("Error connecting to redis-host:6379"))
    finally:
        source.close()
    assert (
        text == "redis redis-host:6379: ConnectionError (its text withheld: it holds the password)"
    )
