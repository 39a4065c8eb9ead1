"""The operator commands, run as the installed `dkim-sidecar` script: `keys` over a key
directory and Mailcow's Redis, `check-config`, `genkey` → `sign` → `verify`, key errors,
`--version`. Every signature is also checked by dkimpy directly."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
import redis
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dkim_sidecar import __version__
from dkim_sidecar.cli.keys import txt_lookup
from dkim_sidecar.dkim.keys import SigningKey, check_published
from harness.dnsserver import TxtServer
from harness.paths import REPO, VECTORS
from harness.postfix import postmap_query
from harness.redis import RedisServer, mailcow_pub_b64, seed_forwarding_host, seed_mailcow
from harness.sidecar import clean_env

CLI = Path(sys.executable).parent / "dkim-sidecar"
PASSWORD = secrets.token_urlsafe(48)

# 512 bits: too small to sign with (RFC 8301); made once with `openssl genrsa 512`.
RSA_512_PEM = (VECTORS / "rsa512_too_small.pem").read_bytes()

MESSAGE = (
    b"From: Alice <alice@example.com>\n"
    b"To: Bob <bob@example.net>\n"
    b"Subject: round trip\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\n"
    b"Message-ID: <rt@example.com>\n"
    b"\n"
    b"Hello,  world \n"
    b"\n"
)


def run(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(CLI), *args],
        input=stdin,
        capture_output=True,
        env=clean_env(**(env or {})),
        timeout=60,
        check=False,
    )


def text(p: subprocess.CompletedProcess[bytes]) -> tuple[str, str]:
    return p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def pkcs8(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pkcs1(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def parse_keys_output(out: str) -> dict[tuple[str, str], dict[str, str]]:
    """`keys` prints, per key, `domain<TAB>selector<TAB>algorithm<TAB>N bits<TAB>source`
    and under it `  <name> TXT "<record>"`."""
    rows: dict[tuple[str, str], dict[str, str]] = {}
    lines = out.splitlines()
    for line, dns in zip(lines[::2], lines[1::2], strict=True):
        domain, selector, algorithm, bits, source = line.split("\t")
        m = re.fullmatch(r'  (\S+) TXT "(.*)"', dns)
        assert m, dns
        rows[(domain, selector)] = {
            "algorithm": algorithm,
            "bits": bits,
            "source": source,
            "name": m[1],
            "txt": m[2],
        }
    return rows


# -- keys: a directory and Mailcow's Redis --------------------------------------------------------


@pytest.fixture(scope="module")
def mailcow() -> Iterator[tuple[RedisServer, redis.Redis]]:
    with RedisServer(password=PASSWORD) as server:
        client = server.client()
        try:
            yield server, client
        finally:
            client.close()


@pytest.fixture(scope="module")
def material() -> dict[str, bytes]:
    return {
        "gen": pkcs8(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "imp": pkcs1(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "dir_rsa": pkcs8(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "dir_ed": pkcs8(ed25519.Ed25519PrivateKey.generate()),
    }


@pytest.fixture
def setup(
    tmp_path: Path, mailcow: tuple[RedisServer, redis.Redis], material: dict[str, bytes]
) -> tuple[Path, Path, redis.Redis]:
    """A key directory (RSA + Ed25519 for dir.example) and Redis (two Mailcow domains)."""
    server, client = mailcow
    client.flushall()
    seed_mailcow(client, "gen.example", "dkim", material["gen"], mailcow_pub_b64(material["gen"]))
    seed_mailcow(client, "imp.example", "s2019", material["imp"], mailcow_pub_b64(material["imp"]))
    # the relay network is a forwarding host too, as it must be for rspamd to let its mail on
    seed_forwarding_host(client, "192.0.2.0/24", keep_spam=False)
    keydir = tmp_path / "keys"
    keydir.mkdir()
    (keydir / "dir.example.rsa1.key").write_bytes(material["dir_rsa"])
    (keydir / "dir.example.ed1.key").write_bytes(material["dir_ed"])
    config = tmp_path / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "relay_networks": ["192.0.2.0/24"],
                "keys": {
                    "directory": str(keydir),
                    "redis": {"host": "127.0.0.1", "port": server.port},
                },
            }
        )
    )
    return config, keydir, client


def test_keys_lists_directory_and_redis_keys_with_dns_records(
    setup: tuple[Path, Path, redis.Redis], mailcow: tuple[RedisServer, redis.Redis]
) -> None:
    config, keydir, client = setup
    port = mailcow[0].port
    p = run("keys", "--config", str(config), env={"REDISPASS": PASSWORD})
    out, err = text(p)
    assert p.returncode == 0, err
    assert err == ""
    rows = parse_keys_output(out)
    assert set(rows) == {
        ("dir.example", "ed1"),
        ("dir.example", "rsa1"),
        ("gen.example", "dkim"),
        ("imp.example", "s2019"),
    }
    expect = {
        ("dir.example", "ed1"): ("ed25519-sha256", "256 bits", f"directory {keydir}", "ed25519"),
        ("dir.example", "rsa1"): ("rsa-sha256", "1024 bits", f"directory {keydir}", "rsa"),
        ("gen.example", "dkim"): ("rsa-sha256", "2048 bits", f"redis 127.0.0.1:{port}", "rsa"),
        ("imp.example", "s2019"): ("rsa-sha256", "1024 bits", f"redis 127.0.0.1:{port}", "rsa"),
    }
    for (domain, selector), (algorithm, bits, source, k) in expect.items():
        row = rows[(domain, selector)]
        assert (row["algorithm"], row["bits"], row["source"]) == (algorithm, bits, source)
        assert row["name"] == f"{selector}._domainkey.{domain}"
        assert row["txt"].startswith(f"v=DKIM1; k={k}; p=")
    # for Mailcow's keys, the record is exactly what Mailcow's UI tells the admin to publish
    for domain, selector in (("gen.example", "dkim"), ("imp.example", "s2019")):
        published = client.hget("DKIM_PUB_KEYS", domain)
        assert published is not None
        assert rows[(domain, selector)]["txt"] == f"v=DKIM1; k=rsa; p={published.decode()}"
    # for the directory's keys, the public half of the file
    for selector in ("ed1", "rsa1"):
        data = (keydir / f"dir.example.{selector}.key").read_bytes()
        key = SigningKey.load("dir.example", selector, data)
        assert rows[("dir.example", selector)]["txt"] == key.dns_record()
    assert PASSWORD not in out + err
    assert "PRIVATE KEY" not in out + err


def test_keys_names_relay_networks_that_are_no_forwarding_host(
    setup: tuple[Path, Path, redis.Redis],
) -> None:
    config, _, client = setup
    client.delete("WHITELISTED_FWD_HOST")
    p = run("keys", "--config", str(config), env={"REDISPASS": PASSWORD})
    _, err = text(p)
    assert p.returncode == 0, err  # a warning: the keys themselves are fine
    assert err.splitlines() == [
        "warning: relay network 192.0.2.0/24 is not a Mailcow forwarding host: rspamd will "
        "reject its mail with From: a Mailcow domain (SPOOFED_UNAUTH) before the sidecar signs "
        "it, unless that domain's SPF record lists it; add it in Mailcow (System > "
        "Configuration > Options > Forwarding Hosts)"
    ]


def test_keys_check_dns_says_which_records_match(
    tmp_path: Path, setup: tuple[Path, Path, redis.Redis]
) -> None:
    """`keys --check-dns` against a zone given as --records (no DNS here): Mailcow's own
    published key for gen.example; imp.example's folded over two strings' worth of spaces;
    the Ed25519 record where the RSA key of dir.example is; nothing for its Ed25519 key."""
    config, _keydir, client = setup
    env = {"REDISPASS": PASSWORD}
    rows = parse_keys_output(text(run("keys", "--config", str(config), env=env))[0])
    gen_pub = client.hget("DKIM_PUB_KEYS", "gen.example")
    assert gen_pub is not None
    gen = gen_pub.decode()  # as Mailcow's UI shows it; in the zone as two strings
    imp = rows[("imp.example", "s2019")]["txt"]
    zone = tmp_path / "zone.txt"
    zone.write_text(
        f'dkim._domainkey.gen.example="v=DKIM1; k=rsa; " "p={gen[:100]}" "{gen[100:]}"\n'
        f"s2019._domainkey.imp.example.={imp[:60]} {imp[60:]}\n"
        f"rsa1._domainkey.dir.example={rows[('dir.example', 'ed1')]['txt']}\n"
    )
    p = run("keys", "--config", str(config), "--check-dns", "--records", str(zone), env=env)
    out, err = text(p)
    assert p.returncode == 1, err
    verdicts = {}
    lines = out.splitlines()
    for head, _record, dns in zip(lines[::3], lines[1::3], lines[2::3], strict=True):
        domain, selector = head.split("\t")[:2]
        verdicts[(domain, selector)] = dns
    assert verdicts == {
        ("gen.example", "dkim"): "  DNS: ok",
        ("imp.example", "s2019"): "  DNS: ok",
        ("dir.example", "rsa1"): "  DNS: WRONG: k=ed25519, but the key is rsa",
        ("dir.example", "ed1"): "  DNS: WRONG: no TXT record at ed1._domainkey.dir.example",
    }
    assert err == "2 key(s) without a matching DNS record\n"
    # published right, the same command says so and exits 0
    zone.write_text("".join(f"{r['name']}={r['txt']}\n" for r in rows.values()))
    p = run("keys", "--config", str(config), "--check-dns", "--records", str(zone), env=env)
    out, err = text(p)
    assert p.returncode == 0, out + err
    assert out.count("  DNS: ok\n") == 4 and err == ""
    # the records answer --check-dns's lookups: without it they are a mistake, said so
    p = run("keys", "--config", str(config), "--records", str(zone), env=env)
    assert p.returncode == 2 and "add it" in text(p)[1]


def test_check_dns_over_real_dns_wire_format(material: dict[str, bytes]) -> None:
    """The DNS side of `keys --check-dns` against a name server on loopback (harness/dnsserver:
    real UDP, real DNS messages): a 2048-bit key's record split into 255-octet strings, as
    zones must publish it, is joined back and matches; two records, none, and a failing
    server each give their own line."""
    key = SigningKey.load("gen.example", "dkim", material["gen"])
    record = key.dns_record().encode()
    assert len(record) > 255
    strings = [record[i : i + 255] for i in range(0, len(record), 255)]
    zone = {
        "dkim._domainkey.gen.example": [strings],
        "two._domainkey.gen.example": [strings, [b"v=DKIM1; p="]],
        "servfail._domainkey.gen.example": None,
    }
    with TxtServer(zone) as server:
        lookup = txt_lookup(None, server.resolver())

        def check(selector: str) -> tuple[bool, str]:
            k = SigningKey.load("gen.example", selector, material["gen"])
            try:
                return check_published(k, lookup(k.dns_name))
            except OSError as exc:
                return False, str(exc)

        assert check("dkim") == (True, "ok")
        assert check("two") == (
            False,
            "2 TXT records at two._domainkey.gen.example; publish exactly one",
        )
        assert check("none") == (False, "no TXT record at none._domainkey.gen.example")
        ok, why = check("servfail")
        assert not ok and why.startswith("DNS lookup failed: ") and "SERVFAIL" in why


@pytest.mark.parametrize("where", ["redis", "directory"])
def test_keys_exits_nonzero_when_one_key_is_unusable(
    setup: tuple[Path, Path, redis.Redis], where: str
) -> None:
    config, keydir, client = setup
    body = secrets.token_urlsafe(60)
    garbage = f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n".encode()
    if where == "redis":
        client.hset("DKIM_SELECTORS", "bad.example", "broken")
        client.hset("DKIM_PRIV_KEYS", "broken.bad.example", garbage)
        client.hset("DKIM_PUB_KEYS", "bad.example", "AAAA")
    else:
        (keydir / "bad.example.broken.key").write_bytes(garbage)
    p = run("keys", "--config", str(config), env={"REDISPASS": PASSWORD})
    out, err = text(p)
    assert p.returncode != 0
    assert "Traceback" not in err
    # the usable keys are still listed
    assert set(parse_keys_output(out)) == {
        ("dir.example", "ed1"),
        ("dir.example", "rsa1"),
        ("gen.example", "dkim"),
        ("imp.example", "s2019"),
    }
    problems = [line for line in err.splitlines() if line.startswith("unusable:")]
    assert len(problems) == 1, err
    assert "bad.example" in problems[0] and "broken" in problems[0]
    assert body not in out + err and body[:16] not in out + err


def test_keys_with_wrong_redis_password_says_so_without_the_password(
    setup: tuple[Path, Path, redis.Redis],
) -> None:
    config, _, _ = setup
    wrong = secrets.token_urlsafe(48)
    p = run("keys", "--config", str(config), env={"REDISPASS": wrong})
    out, err = text(p)
    assert p.returncode != 0
    assert "unreachable:" in err and "authentication failed" in err
    assert ("dir.example", "rsa1") in parse_keys_output(out)  # the directory still answers
    assert wrong not in out + err and PASSWORD not in out + err
    assert "Traceback" not in err


# -- check-config ---------------------------------------------------------------------------------


def test_check_config_ok(setup: tuple[Path, Path, redis.Redis]) -> None:
    config, _, _ = setup
    p = run("check-config", "--config", str(config), env={"REDISPASS": PASSWORD})
    out, err = text(p)
    assert p.returncode == 0, err
    assert out.strip() == f"{config}: config OK; 4 keys for 3 domains"


def test_check_config_reports_every_mistake_with_file_and_key_path(tmp_path: Path) -> None:
    config = tmp_path / "dkim-sidecar.yml"
    config.write_text(
        "relay_networks:\n"
        "  - 192.0.2.0/24\n"
        "  - 192.0.2.0/33\n"  # 1: no such prefix length
        "on_error: maybe\n"  # 2: not a choice
        "keys:\n"
        "  redis:\n"
        "    host: 127.0.0.1\n"
        "    port: 70000\n"  # 3: not a port
    )
    p = run("check-config", "--config", str(config))
    out, err = text(p)
    assert p.returncode != 0
    assert "Traceback" not in err and "config OK" not in out
    lines = [line for line in err.splitlines() if line.startswith(f"{config}: ")]
    assert len(lines) == 3, err
    paths = [line.removeprefix(f"{config}: ").split(":", 1)[0] for line in lines]
    assert paths == ["relay_networks[1]", "on_error", "keys.redis.port"]
    assert "192.0.2.0/33" in lines[0]
    assert "maybe" in lines[1] and "accept" in lines[1] and "tempfail" in lines[1]
    assert "70000" in lines[2]


# -- genkey, sign, verify -------------------------------------------------------------------------


def genkey(out: Path, selector: str, *extra: str) -> tuple[Path, str, str]:
    """`genkey`: the key file, and the DNS record it prints (name, TXT)."""
    p = run("genkey", "-d", "example.com", "-s", selector, "--out", str(out), *extra)
    stdout, err = text(p)
    assert p.returncode == 0, err
    m = re.search(r'^(\S+)\. IN TXT "(.*)"$', stdout, re.M)
    assert m, stdout
    path = out / f"example.com.{selector}.key"
    assert path.exists() and path.stat().st_mode & 0o077 == 0  # 0600
    return path, m[1], m[2]


def test_sign_then_verify_round_trip(tmp_path: Path) -> None:
    rsa_file, rsa_name, rsa_txt = genkey(tmp_path, "rsa1", "--bits", "1024")
    ed_file, ed_name, ed_txt = genkey(tmp_path, "ed1", "--algorithm", "ed25519")
    assert rsa_name == "rsa1._domainkey.example.com" and rsa_txt.startswith("v=DKIM1; k=rsa; p=")
    assert ed_txt.startswith("v=DKIM1; k=ed25519; p=")

    p = run(
        "sign",
        *("-d", "example.com", "-s", "rsa1", "-k", str(rsa_file), "-s", "ed1", "-k", str(ed_file)),
        stdin=MESSAGE,
    )
    signed, err = p.stdout, p.stderr.decode()
    assert p.returncode == 0, err
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert signed.endswith(MESSAGE.replace(b"\n", b"\r\n"))

    records = ["--record", f"{rsa_name}={rsa_txt}", "--record", f'{ed_name}="{ed_txt}"']
    p = run("verify", *records, stdin=signed)
    out, err = text(p)
    assert p.returncode == 0, out + err
    assert out.splitlines() == [
        "signature 1: d=example.com s=rsa1 a=rsa-sha256: pass",
        "signature 2: d=example.com s=ed1 a=ed25519-sha256: pass",
    ]

    # dkimpy, directly
    dns = {f"{rsa_name}.".encode(): rsa_txt.encode(), f"{ed_name}.".encode(): ed_txt.encode()}
    d = dkim.DKIM(signed)
    for i in range(2):
        assert d.verify(idx=i, dnsfunc=lambda name, timeout=5: dns.get(name))

    # a changed body fails both, and verify says so with exit 1
    p = run("verify", *records, stdin=signed.replace(b"Hello,", b"Hullo,"))
    out, _ = text(p)
    assert p.returncode == 1
    assert out.count("FAIL") == 2
    # a wrong published key fails too
    _, _, other_txt = genkey(tmp_path / "other", "rsa1", "--bits", "1024")
    p = run("verify", "--record", f"{rsa_name}={other_txt}", stdin=signed)
    assert p.returncode == 1


# The case of CPython's email test corpus (msg_35.txt): the header block ends without the empty
# line, at a line that is neither a header field nor a continuation.
NO_SEPARATOR = (
    b"From: aperson@dom.ain\n"
    b"To: bperson@dom.ain\n"
    b"Subject: here's something interesting\n"
    b"counter to RFC 2822, there's no separating newline here\n"
)


@pytest.mark.parametrize(
    ("message", "written"),
    [
        (
            NO_SEPARATOR,
            NO_SEPARATOR.replace(b"\n", b"\r\n").replace(b"\r\ncounter", b"\r\n\r\ncounter"),
        ),
        (
            b"From: a@dom.ain\r\nnot a field: a space in the name\r\nmore\r\n",
            b"From: a@dom.ain\r\n\r\nnot a field: a space in the name\r\nmore\r\n",
        ),
    ],
    ids=["cpython-msg_35", "space-in-name"],
)
def test_sign_inserts_the_missing_empty_line_as_postfix_does(
    tmp_path: Path, message: bytes, written: bytes
) -> None:
    """Never write a signature no verifier accepts: the empty line goes in, stderr says so,
    and dkimpy verifies the output."""
    key_file, name, txt = genkey(tmp_path, "s1", "--bits", "1024")
    p = run("sign", "-d", "example.com", "-s", "s1", "-k", str(key_file), stdin=message)
    out, err = p.stdout, p.stderr.decode()
    assert p.returncode == 0, err
    assert "ended without an empty line; inserted one" in err
    assert out.startswith(b"DKIM-Signature:") and out.endswith(b"\r\n" + written), out
    dns = {f"{name}.".encode(): txt.encode()}
    assert dkim.DKIM(out).verify(dnsfunc=lambda qname, timeout=5: dns.get(qname))
    # with the empty line already there, nothing is inserted and nothing is said
    p = run("sign", "-d", "example.com", "-s", "s1", "-k", str(key_file), stdin=MESSAGE)
    assert p.returncode == 0 and p.stderr == b""


@pytest.mark.parametrize(
    ("pem", "why"),
    [
        (RSA_512_PEM, "RSA key of 512 bits is too small"),
        (
            b"-----BEGIN PRIVATE KEY-----\nMIIBVgIBADANBgkqhkiG9w0BAQEFAASC\n"
            b"-----END PRIVATE KEY-----\n",
            "not a readable PEM private key",
        ),
        (b"-----BEGIN RSA PRIVATE KEY-----\n", "not a readable PEM private key"),
    ],
    ids=["rsa-512", "malformed-pem", "truncated-pem"],
)
def test_sign_with_an_unusable_key_gives_one_clear_line(
    tmp_path: Path, pem: bytes, why: str
) -> None:
    key = tmp_path / "bad.key"
    key.write_bytes(pem)
    p = run("sign", "-d", "example.com", "-s", "s1", "-k", str(key), stdin=MESSAGE)
    out, err = text(p)
    assert p.returncode == 2
    assert out == ""  # nothing half-signed on stdout
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dkim-sidecar: error: s1._domainkey.example.com")
    assert why in lines[0]
    assert str(key) in lines[0]  # which file


def test_version() -> None:
    p = run("--version")
    out, err = text(p)
    assert p.returncode == 0, err
    assert out.strip() == f"dkim-sidecar {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)


def test_sign_with_an_unknown_canonicalization_gives_one_clear_line(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_bytes(pkcs8(ed25519.Ed25519PrivateKey.generate()))
    p = run(
        "sign",
        "-d",
        "example.com",
        "-s",
        "s1",
        "-k",
        str(key),
        "--canon",
        "loose/relaxed",
        stdin=MESSAGE,
    )
    out, err = text(p)
    assert p.returncode == 2 and out == ""
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        "dkim-sidecar: error: --canon: 'loose/relaxed' is not a canonicalization "
        "(expected simple or relaxed for header and body, e.g. relaxed/relaxed)"
    ]


# --- postfix-map ---------------------------------------------------------------------------------


def test_milter_map_lines_write_mapped_networks_as_ipv4_once() -> None:
    from ipaddress import ip_network

    from dkim_sidecar.cli.keys import milter_map_lines

    nets = [ip_network(n) for n in ("192.0.2.0/28", "2001:db8:1::/64", "::ffff:192.0.2.0/124")]
    nets.append(ip_network("::ffff:203.0.113.7/128"))
    assert milter_map_lines(nets, "M") == [
        "192.0.2.0/28\tM",
        "2001:db8:1::/64\tM",
        "203.0.113.7/32\tM",
    ]


def postmap(table: Path, address: str) -> str | None:
    return postmap_query(f"cidr:{table}", address, table.parent / "postfix-etc")


def test_postfix_map_is_a_table_postfix_reads(setup: tuple[Path, Path, redis.Redis]) -> None:
    """Relay networks from the config and Mailcow's forwarding hosts (KEEP_SPAM) from Redis;
    Postfix's own postmap finds the milters for those clients and nothing for others."""
    from harness.redis import seed_forwarding_name

    config, _, client = setup
    data = yaml.safe_load(config.read_text())
    data["relay_networks"] = ["192.0.2.0/24", "2001:db8:1::/64"]
    data["relay_networks_from_mailcow"] = "keep_spam"
    config.write_text(yaml.safe_dump(data))
    seed_forwarding_host(client, "198.51.100.0/28", keep_spam=True)
    seed_forwarding_host(client, "203.0.113.9", keep_spam=False)  # spam filter on: not ours
    # typed as a name: Mailcow stored that domain's networks, someone else's
    seed_forwarding_name(client, "mail.example.org", ["198.51.100.128/25"], keep_spam=True)
    p = run("postfix-map", "--config", str(config), env={"REDISPASS": PASSWORD})
    out, err = text(p)
    assert p.returncode == 0, err
    p = run("keys", "--config", str(config), env={"REDISPASS": PASSWORD})
    _, keys_err = text(p)
    assert p.returncode == 1
    assert "198.51.100.128/25 were expanded by Mailcow from the host name 'mail.example.org'" in (
        keys_err
    )
    table = config.parent / "milters.cidr"
    table.write_text(out)
    from dkim_sidecar.cli.keys import DEFAULT_MAP_MILTERS

    for inside in ("192.0.2.77", "2001:db8:1::25", "198.51.100.3"):
        assert postmap(table, inside) == DEFAULT_MAP_MILTERS
    for outside in ("192.0.3.1", "198.51.100.16", "198.51.100.130", "203.0.113.9", "2001:db8:2::1"):
        assert postmap(table, outside) is None


def test_postfix_map_with_redis_down_says_what_is_missing(tmp_path: Path) -> None:
    from harness.sidecar import free_port

    config = tmp_path / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "relay_networks": ["192.0.2.0/24"],
                "relay_networks_from_mailcow": "forwarding_hosts",
                "keys": {"redis": {"host": "127.0.0.1", "port": free_port()}},
            }
        )
    )
    p = run("postfix-map", "--config", str(config), env={"REDISPASS": PASSWORD})
    out, err = text(p)
    assert p.returncode == 1
    assert "192.0.2.0/24\t" in out
    assert "unreachable (its networks are missing above)" in err and PASSWORD not in err


def test_postfix_maps_default_milters_are_the_line_of_postfix_extra_cf() -> None:
    """`postfix-map` writes, for each relay network, the milter list that config/postfix-extra.cf
    gives smtpd_milters: the two must never drift apart."""
    from dkim_sidecar.cli.keys import DEFAULT_MAP_MILTERS

    extra = REPO / "config" / "postfix-extra.cf"
    lines = [ln for ln in extra.read_text().splitlines() if ln.startswith("smtpd_milters = ")]
    assert len(lines) == 1, lines
    assert lines[0].removeprefix("smtpd_milters = ") == DEFAULT_MAP_MILTERS
