"""One rule for domains and selectors (dkim/names.py), whichever path a name comes in by: the
config (a table entry), a key directory (the file name), Mailcow's Redis (as its UI stores
keys), and SigningKey itself. Each name is accepted by all of them or refused by all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import rsa

from dkim_sidecar.config import ConfigError, parse_config
from dkim_sidecar.dkim.keys import KeyLoadError, SigningKey
from dkim_sidecar.keysources.local import DirectoryKeySource
from dkim_sidecar.keysources.mailcow import RedisKeySource
from dkim_sidecar.keysources.specs import RedisSource
from harness.redis import RedisServer, mailcow_pub_b64, seed_mailcow

PASSWORD = "names-test-password"

# (selector, accepted): what Mailcow's UI can store (letters, digits, "-", "_", ".") is taken
SELECTORS = [
    ("dkim", True),
    ("s_1", True),
    ("_s1", True),
    ("s2024.eu", True),
    ("Rsa-2048", True),
    ("-x", False),
    ("x-", False),
    ("a+b", False),
    ("x..y", False),
]
DOMAINS = [
    ("example.com", True),
    ("sub_domain.example.com", True),
    ("bücher.example", True),
    ("localhost", False),
    ("example.123", False),
    ("-a.example", False),
]


@pytest.fixture(scope="module")
def pem() -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def client() -> Iterator[tuple[RedisServer, redis.Redis]]:
    with RedisServer(password=PASSWORD) as server:
        c = server.client()
        try:
            yield server, c
        finally:
            c.close()


def by_config(domain: str, selector: str, tmp_path: Path) -> bool:
    entry = {"domain": domain, "selector": selector, "key_file": str(tmp_path / "k.pem")}
    try:
        parse_config({"keys": {"table": [entry]}}, "config.yml", {})
    except ConfigError:
        return False
    return True


def by_key(domain: str, selector: str, pem: bytes) -> bool:
    try:
        SigningKey.load(domain, selector, pem)
    except KeyLoadError:
        return False
    return True


def by_directory(domain: str, selector: str, pem: bytes, tmp_path: Path) -> bool:
    directory = tmp_path / "keys"
    directory.mkdir()
    (directory / f"{domain}.{selector}.key").write_bytes(pem)
    keys = DirectoryKeySource(str(directory)).load().keys
    return len(keys) == 1 and keys[0].selector == selector.lower()


def by_redis(domain: str, selector: str, pem: bytes, server: RedisServer, c: redis.Redis) -> bool:
    c.flushall()
    seed_mailcow(c, domain, selector, pem, mailcow_pub_b64(pem))
    source = RedisKeySource(RedisSource(host=server.host, port=server.port), PASSWORD)
    try:
        return len(source.load().keys) == 1
    finally:
        source.close()


@pytest.mark.parametrize(
    ("domain", "selector", "accepted"),
    [("example.com", s, ok) for s, ok in SELECTORS] + [(d, "s1", ok) for d, ok in DOMAINS],
)
def test_every_path_takes_the_same_names(
    domain: str,
    selector: str,
    accepted: bool,
    pem: bytes,
    client: tuple[RedisServer, redis.Redis],
    tmp_path: Path,
) -> None:
    verdicts = {
        "config": by_config(domain, selector, tmp_path),
        "SigningKey": by_key(domain, selector, pem),
        "redis": by_redis(domain, selector, pem, *client),
    }
    if "." not in selector:  # a key file's selector is the last label of its name
        verdicts["directory"] = by_directory(domain, selector, pem, tmp_path)
    assert verdicts == dict.fromkeys(verdicts, accepted)
