"""keys.py: reading private keys in the formats Mailcow and operators hand us, refusing the ones we
must not use with a clear message that never echoes key material, the DNS record, DNS names."""

from __future__ import annotations

import base64
import random
import re
import traceback
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from dkim_sidecar.dkim.canon import Canonicalization
from dkim_sidecar.dkim.header import split_message
from dkim_sidecar.dkim.keys import (
    Algorithm,
    KeyLoadError,
    SigningKey,
    check_dns_name,
    check_published,
    generate_key,
    parse_private_key,
)
from dkim_sidecar.dkim.signer import MessageSigner, SigningPolicy
from harness.paths import VECTORS

RFC8463_RSA_PEM = (VECTORS / "rfc8463_a1_rsa.pem").read_bytes()
RFC8463_ED25519_SEED = (VECTORS / "rfc8463_a1_ed25519.seed").read_bytes()


def rfc8463_dns() -> dict[str, str]:
    """RFC 8463 A.2 zone text: name -> TXT record (its quoted strings joined)."""
    zone = (VECTORS / "rfc8463_a2_dns.zone").read_text()
    return {
        m.group(1): "".join(re.findall(r'"([^"]*)"', m.group(2)))
        for m in re.finditer(r"(\S+)\. IN TXT \((.*?)\)", zone, re.S)
    }


@pytest.fixture(scope="module")
def rsa1024() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def pem(
    key: Any, fmt: ser.PrivateFormat, enc: ser.KeySerializationEncryption | None = None
) -> bytes:
    data: bytes = key.private_bytes(ser.Encoding.PEM, fmt, enc or ser.NoEncryption())
    return data


def same_public(a: Any, b: Any) -> bool:
    def spki(k: Any) -> bytes:
        der: bytes = k.public_key().public_bytes(
            ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo
        )
        return der

    return spki(a) == spki(b)


# --- formats that load ---------------------------------------------------------------------------


def test_rsa_pkcs8_pem(rsa1024: rsa.RSAPrivateKey) -> None:
    key = parse_private_key(pem(rsa1024, ser.PrivateFormat.PKCS8))
    assert isinstance(key, rsa.RSAPrivateKey) and same_public(key, rsa1024)


def test_rsa_pkcs1_pem(rsa1024: rsa.RSAPrivateKey) -> None:
    data = pem(rsa1024, ser.PrivateFormat.TraditionalOpenSSL)
    assert data.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert same_public(parse_private_key(data), rsa1024)


@pytest.mark.parametrize("fmt", [ser.PrivateFormat.PKCS8, ser.PrivateFormat.TraditionalOpenSSL])
def test_crlf_pem_with_surrounding_blank_lines(
    rsa1024: rsa.RSAPrivateKey, fmt: ser.PrivateFormat
) -> None:
    data = b"\r\n\r\n" + pem(rsa1024, fmt).replace(b"\n", b"\r\n") + b"\r\n \r\n"
    assert same_public(parse_private_key(data), rsa1024)


def test_ed25519_pkcs8_pem(ed_key: ed25519.Ed25519PrivateKey) -> None:
    key = parse_private_key(pem(ed_key, ser.PrivateFormat.PKCS8))
    assert isinstance(key, ed25519.Ed25519PrivateKey) and same_public(key, ed_key)


@pytest.mark.parametrize("layout", [lambda s: s, lambda s: s[:20] + b"\n  " + s[20:] + b"\r\n"])
def test_ed25519_base64_seed(ed_key: ed25519.Ed25519PrivateKey, layout: Any) -> None:
    seed = ed_key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    key = parse_private_key(layout(base64.b64encode(seed)))
    assert same_public(key, ed_key)


def test_rfc8463_keys_give_the_rfc_dns_records() -> None:
    # RFC 8463 A.1 keys, A.2 records: the p= is independent of our code
    dns = rfc8463_dns()
    ed = SigningKey.load("football.example.com", "brisbane", RFC8463_ED25519_SEED)
    rs = SigningKey.load("football.example.com", "test", RFC8463_RSA_PEM)
    assert ed.dns_name == "brisbane._domainkey.football.example.com"
    assert rs.dns_name == "test._domainkey.football.example.com"
    assert ed.dns_record() == dns[ed.dns_name]
    assert rs.dns_record() == dns[rs.dns_name]
    assert (ed.algorithm, ed.bits) == (Algorithm.ED25519_SHA256, 256)
    assert (rs.algorithm, rs.bits) == (Algorithm.RSA_SHA256, 1024)


@pytest.mark.parametrize(
    ("algorithm", "bits"),
    [(Algorithm.RSA_SHA256, 1024), (Algorithm.RSA_SHA256, 2048), (Algorithm.ED25519_SHA256, 256)],
)
def test_generated_key_round_trip_and_dns_record_dkimpy_reads(
    algorithm: Algorithm, bits: int
) -> None:
    data = generate_key(algorithm, bits)
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    key = SigningKey.load("Example.COM", "Sel_1", data, source="test")
    assert (key.domain, key.selector, key.algorithm, key.bits) == (
        "example.com",
        "sel_1",
        algorithm,
        bits,
    )
    record = key.dns_record()
    assert re.fullmatch(rf"v=DKIM1; k={algorithm.key_type}; p=[A-Za-z0-9+/]+=*", record)
    # dkimpy parses the record into the same public key
    pk, keysize, ktag, _ = dkim.load_pk_from_dns(
        b"sel_1._domainkey.example.com.", lambda name, timeout=5: record.encode()
    )
    assert ktag == algorithm.key_type.encode()
    if algorithm is Algorithm.RSA_SHA256:
        public = key.key.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        numbers = public.public_numbers()
        assert (pk["modulus"], pk["publicExponent"], keysize) == (numbers.n, numbers.e, bits)
    else:
        raw = key.key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
        assert bytes(pk) == raw


def test_key_type_tag() -> None:
    assert Algorithm.RSA_SHA256.key_type == "rsa"
    assert Algorithm.ED25519_SHA256.key_type == "ed25519"
    assert Algorithm("ed25519-sha256") is Algorithm.ED25519_SHA256


# --- the published record (keys --check-dns) ----------------------------------------------------


def test_rfc8463_records_match_their_keys() -> None:
    """RFC 8463 A.2's records, as the RFC prints them (an oracle independent of our
    dns_record()), check out against the A.1 keys; swapped, they do not."""
    dns = rfc8463_dns()
    ed = SigningKey.load("football.example.com", "brisbane", RFC8463_ED25519_SEED)
    rs = SigningKey.load("football.example.com", "test", RFC8463_RSA_PEM)
    assert check_published(ed, [dns[ed.dns_name].encode()]) == (True, "ok")
    assert check_published(rs, [dns[rs.dns_name].encode()]) == (True, "ok")
    assert check_published(rs, [dns[ed.dns_name].encode()]) == (
        False,
        "k=ed25519, but the key is rsa",
    )


@pytest.fixture(scope="module")
def published(rsa1024: rsa.RSAPrivateKey) -> tuple[SigningKey, str]:
    key = SigningKey.load(
        "example.com",
        "s1",
        rsa1024.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()),
    )
    return key, key.public_key_b64()


@pytest.mark.parametrize(
    ("record", "ok", "says", "dkimpy"),
    [
        ("v=DKIM1; k=rsa; p={p}", True, "ok", True),
        ("v=DKIM1;k=rsa;p={p};", True, "ok", True),  # no spaces, a trailing ;
        ("p={p}", True, "ok", True),  # v= and k= are optional (k= defaults to rsa)
        ("v=DKIM1; h=sha1:sha256; s=email; p={p}", True, "ok", True),
        ("v=DKIM1; t=y; p={p}", True, "ok (t=y: testing mode", True),
        ("v=DKIM1; p={p_folded}", True, "ok", True),  # whitespace inside p= (long TXT strings)
        ("v=DKIM1; p={p_pkcs1}", True, "ok", True),  # the bare RSAPublicKey form
        ("v=DKIM1; k=rsa; p=", False, "p= is empty: the key is revoked", False),
        ("v=DKIM1; k=rsa; p={other}", False, "p= is a different key", False),
        ("v=DKIM1; k=ed25519; p={p}", False, "k=ed25519, but the key is rsa", False),
        ("k=rsa; v=DKIM1; p={p}", False, "v=DKIM1 must be the first tag", True),
        ("v=DKIM2; p={p}", False, "v=DKIM2: not a DKIM key record", False),
        ("v=DKIM1; h=sha1; p={p}", False, "h=sha1 does not allow sha256", True),
        ("v=DKIM1; s=tlsrpt; p={p}", False, "s=tlsrpt: not for email", False),
        ("v=DKIM1; p={p}; p={p}", False, "not a DKIM key record: tag p= given twice", False),
        ("v=DKIM1; k=rsa", False, "no p= tag", False),
        ("v=DKIM1; p=not*base64", False, "p= is not base64", False),
        ("v=DKIM1; k=RSA; p={p}", False, "k=RSA: write it in lower case", False),
        ("v=DKIM1; h=SHA256; p={p}", False, "h=SHA256: write it in lower case", True),
        ("v=DKIM1; s=Email; p={p}", False, "s=Email: write it in lower case", False),
        ("v=DKIM1; s=*; p={p}", True, "ok", True),
        ("v=spf1 -all", False, "v=spf1 -all: not a DKIM key record", False),
        ("hello", False, "not a DKIM key record: 'hello' is not tag=value", False),
    ],
)
def test_published_record_checks(
    published: tuple[SigningKey, str], record: str, ok: bool, says: str, dkimpy: bool
) -> None:
    """`dkimpy`: whether dkimpy verifies with this record. It agrees with us but where it is
    laxer than RFC 6376 §3.6.1: v= not first (a MUST for the publisher), and h= (dkimpy does
    not read it; verifiers must refuse a hash it does not list)."""
    key, p = published
    other = SigningKey.load("example.com", "s1", generate_key(Algorithm.RSA_SHA256, 1024))
    public = key.key.public_key()
    pkcs1 = public.public_bytes(ser.Encoding.DER, ser.PublicFormat.PKCS1)
    txt = record.format(
        p=p,
        p_folded=" ".join(p[i : i + 50] for i in range(0, len(p), 50)),
        p_pkcs1=base64.b64encode(pkcs1).decode(),
        other=other.public_key_b64(),
    )
    got_ok, got = check_published(key, [txt.encode()])
    assert got_ok is ok and got.startswith(says), got
    # dkimpy, reading the same record: it verifies a signature of this key when we said
    # the record is good, and (but for its two leniencies) only then
    message = b"From: <a@example.com>\r\nSubject: dns\r\n\r\nbody\r\n"
    signer = MessageSigner(
        [key],
        SigningPolicy(Canonicalization.parse("relaxed/relaxed"), ("from", "subject")),
        1_700_000_000,
    )
    signer.update(b"body\r\n")
    fields, _ = split_message(message)
    signed = signer.sign(fields)[0] + message
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: txt.encode()) is dkimpy


def test_published_ed25519_record() -> None:
    """RFC 8463 §4.2: k=ed25519 and the bare 32-byte key. The usual mistakes get a line that
    says what to change, not just "wrong"."""
    key = SigningKey.load("football.example.com", "brisbane", RFC8463_ED25519_SEED)
    raw = key.public_key_b64()
    spki = base64.b64encode(
        key.key.public_key().public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    ).decode()
    assert check_published(key, [f"v=DKIM1; k=ed25519; p={raw}".encode()]) == (True, "ok")
    ok, why = check_published(key, [f"v=DKIM1; p={raw}".encode()])
    assert not ok and why == "no k= tag (which means k=rsa), but the key is ed25519: add k=ed25519"
    ok, why = check_published(key, [f"v=DKIM1; k=ed25519; p={spki}".encode()])
    assert not ok and why.startswith("p= holds this key as SubjectPublicKeyInfo")
    assert check_published(key, ["v=DKIM1; k=ed25519; p=\u00e9".encode()]) == (
        False,
        "not a DKIM key record: it holds non-ASCII octets",
    )


def test_published_record_missing_or_ambiguous(published: tuple[SigningKey, str]) -> None:
    key, p = published
    assert check_published(key, []) == (False, "no TXT record at s1._domainkey.example.com")
    twice = [f"v=DKIM1; p={p}".encode()] * 2
    assert check_published(key, twice)[1].startswith("2 TXT records at s1._domainkey")


# --- keys we refuse ------------------------------------------------------------------------------


def _is_probable_prime(n: int, rng: random.Random) -> bool:
    if n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(24):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def small_rsa_pem(bits: int = 512) -> bytes:
    """An RSA key below the floor: cryptography refuses to generate one, so build it."""
    rng = random.Random(bits)
    e = 65537

    def prime() -> int:
        while True:
            p = rng.getrandbits(bits // 2) | (3 << (bits // 2 - 2)) | 1
            if (p - 1) % e and _is_probable_prime(p, rng):
                return p

    p, q = prime(), prime()
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    key = numbers.private_key()
    assert key.key_size == bits
    return pem(key, ser.PrivateFormat.PKCS8)


def _garbage_pem() -> bytes:
    return (
        b"-----BEGIN PRIVATE KEY-----\n"
        b"Tm90IGEga2V5IGF0IGFsbCwganVzdCB0ZXh0\n"
        b"-----END PRIVATE KEY-----\n"
    )


def _truncated(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join(lines[: len(lines) // 2])


def refused_cases(rsa1024: rsa.RSAPrivateKey) -> list[tuple[str, bytes, str]]:
    """(id, key data, text the error must contain)"""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    return [
        ("empty", b"", "empty"),
        ("blank", b" \r\n\t\n", "empty"),
        ("rsa-512", small_rsa_pem(512), "too small"),
        ("garbage-pem", _garbage_pem(), "PEM"),
        ("truncated-pkcs8", _truncated(pem(rsa1024, ser.PrivateFormat.PKCS8)), "PEM"),
        ("truncated-pkcs1", _truncated(pem(rsa1024, ser.PrivateFormat.TraditionalOpenSSL)), "PEM"),
        ("ec-pkcs8", pem(ec_key, ser.PrivateFormat.PKCS8), "RSA or Ed25519"),
        ("ec-sec1", pem(ec_key, ser.PrivateFormat.TraditionalOpenSSL), "RSA or Ed25519"),
        ("dsa", pem(dsa.generate_private_key(1024), ser.PrivateFormat.PKCS8), "RSA or Ed25519"),
        (
            "encrypted-pkcs8",
            pem(rsa1024, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(b"pw")),
            "encrypted",
        ),
        (
            "public-key",
            rsa1024.public_key().public_bytes(
                ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo
            ),
            "PEM",
        ),
        ("base64-not-32", base64.b64encode(b"\x01" * 31), "32 bytes"),
        ("not-base64", b"this is not a key!", "neither a PEM private key nor a base64"),
    ]


def _body_lines(data: bytes) -> list[str]:
    """The key's PEM body lines (what must never be echoed), long enough to be meaningful."""
    return [
        line.strip().decode("ascii", "replace")
        for line in data.splitlines()
        if len(line.strip()) >= 8 and not line.startswith(b"-----")
    ]


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc.args)


def test_refused_keys_each_give_a_clear_error_without_key_material(
    rsa1024: rsa.RSAPrivateKey,
) -> None:
    for name, data, expect in refused_cases(rsa1024):
        with pytest.raises(KeyLoadError) as info:
            parse_private_key(data)
        assert expect in str(info.value), (name, str(info.value))
        with pytest.raises(KeyLoadError) as wrapped:
            SigningKey.load("example.com", "s1", data, source="/etc/keys/s1.pem")
        message = str(wrapped.value)
        assert message.startswith("s1._domainkey.example.com (/etc/keys/s1.pem): "), message
        assert expect in message, name
        for exc in (info.value, wrapped.value):
            text = _all_text(exc)
            for line in _body_lines(data):
                assert line not in text, (name, "key material in the error")


def test_encrypted_pkcs8_names_the_passphrase(rsa1024: rsa.RSAPrivateKey) -> None:
    data = pem(rsa1024, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(b"pw"))
    with pytest.raises(KeyLoadError, match="encrypted with a passphrase"):
        parse_private_key(data)


def test_encrypted_pkcs1_names_the_passphrase(rsa1024: rsa.RSAPrivateKey) -> None:
    data = pem(rsa1024, ser.PrivateFormat.TraditionalOpenSSL, ser.BestAvailableEncryption(b"pw"))
    assert b"Proc-Type: 4,ENCRYPTED" in data
    with pytest.raises(KeyLoadError, match="encrypted"):
        parse_private_key(data)


def test_encrypted_pkcs1_is_refused_without_key_material(rsa1024: rsa.RSAPrivateKey) -> None:
    # Whatever the message, it is refused and does not echo the key.
    data = pem(rsa1024, ser.PrivateFormat.TraditionalOpenSSL, ser.BestAvailableEncryption(b"pw"))
    with pytest.raises(KeyLoadError) as info:
        parse_private_key(data)
    for line in _body_lines(data):
        assert line not in _all_text(info.value)


def test_rsa_above_4096_bits_is_refused() -> None:
    # RFC 8301 §3.2: verifiers need only handle up to 4096 bits. A throwaway 4104-bit test key
    # kept in tests/vectors/ (generating one, or an 8192-bit one, takes seconds).
    data = (VECTORS / "rsa4104_too_large.pem").read_bytes()
    with pytest.raises(KeyLoadError, match="RSA key of 4104 bits is too large") as info:
        parse_private_key(data)
    for line in _body_lines(data):
        assert line not in _all_text(info.value)


def test_rsa_512_message_names_size_and_floor() -> None:
    with pytest.raises(KeyLoadError, match=r"RSA key of 512 bits is too small \(at least 1024"):
        parse_private_key(small_rsa_pem(512))


def test_load_refuses_bad_names_before_reading_the_key() -> None:
    with pytest.raises(KeyLoadError, match=r"'bad domain' is not a valid domain name"):
        SigningKey.load("bad domain", "s1", RFC8463_ED25519_SEED)
    with pytest.raises(KeyLoadError, match=r"'-s1' is not a valid selector name"):
        SigningKey.load("example.com", "-s1", RFC8463_ED25519_SEED)


def test_signing_key_repr_and_equality_leave_the_key_out() -> None:
    a = SigningKey.load("example.com", "s1", RFC8463_ED25519_SEED)
    b = SigningKey.load("example.com", "s1", generate_key(Algorithm.ED25519_SHA256))
    assert "key=" not in repr(a) and "nWGxne" not in repr(a)
    assert a == b  # compare=False on the key: identity is domain, selector, source


# --- check_dns_name ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        (" example.com ", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),  # U-label -> A-label (RFC 5890)
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("münchen.de", "xn--mnchen-3ya.de"),
        ("bu\u0308cher.example", "xn--bcher-kva.example"),  # decomposed ü: same name (NFC)
        ("xn--strae-oqa.de", "xn--strae-oqa.de"),  # straße as IDNA 2008 encodes it
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("sel_2024", "sel_2024"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 62] * 4), ".".join(["a" * 62] * 4)),  # 251 octets
    ],
)
def test_check_dns_name_accepts(name: str, expected: str) -> None:
    assert check_dns_name(name, "selector") == expected
    if "." in expected:  # a signing domain needs two labels
        assert check_dns_name(name, "domain") == expected


def test_a_signing_domain_needs_two_labels_and_a_name_for_its_top() -> None:
    for name in ("localhost", "example.123"):
        with pytest.raises(KeyLoadError, match="is not a valid domain name"):
            check_dns_name(name, "domain")


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "a..b",
        ".example.com",
        "-a.example",
        "a-.example",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4),  # 255 octets
        "exa mple.com",
        "ex@mple.com",
        "example.com/x",
        "a;b.example",
        "ü" * 70 + ".de",
        # IDNA 2003 (Python's codec) maps these onto other names, IDNA 2008 keeps them apart:
        # straße.de would be signed as strasse.de, someone else's domain (RFC 5890 vs 3490)
        "straße.de",
        "ὀδυσσεύς.example",  # final sigma
        "ﬁle.example",  # compatibility ligature: file.example under IDNA 2003
    ],
)
def test_check_dns_name_refuses(name: str) -> None:
    with pytest.raises(KeyLoadError, match="is not a valid selector name"):
        check_dns_name(name, "selector")
