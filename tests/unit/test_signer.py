"""signer.py: every signature we make is checked by an independent verifier (dkimpy, DNS stubbed
from a dict), against RFC 8463 Appendix A, and byte for byte against golden output made with a
fixed clock and deterministic keys (Ed25519; RSASSA-PKCS1-v1_5 is deterministic too)."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Callable, Iterable, Sequence

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dkim_sidecar.dkim.canon import BodyHasher, Canon, Canonicalization, canon_header_relaxed
from dkim_sidecar.dkim.header import HeaderField, split_message
from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from dkim_sidecar.dkim.signer import MessageSigner, SigningPolicy
from harness.paths import VECTORS
from vectors import regenerate as golden

CRLF = b"\r\n"
NOW = 1_700_000_000
ALL_C = ["relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"]

# --- helpers -------------------------------------------------------------------------------------


def tags_of(field: bytes) -> dict[str, str]:
    """Tag list of one DKIM-Signature field, values with all whitespace removed (test-side parser,
    deliberately not keys.parse_tag_list)."""
    value = field.split(b":", 1)[1].decode("ascii")
    out = {}
    for part in value.split(";"):
        if "=" in part:
            tag, _, val = part.partition("=")
            out[tag.strip()] = re.sub(r"\s+", "", val)
    return out


def stub_dns(records: dict[str, str]) -> Callable[..., bytes | None]:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        record = records.get(name.decode("ascii").rstrip(".").lower())
        return record.encode("ascii") if record is not None else None

    return dnsfunc


def verify(message: bytes, records: dict[str, str], idx: int = 0) -> str:
    """dkimpy's verdict on signature `idx`: 'pass', 'fail' (b= does not verify) or 'invalid: ...'
    (dkimpy raised, e.g. on a body hash mismatch)."""
    d = dkim.DKIM(message)
    assert sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature") > idx
    try:
        return "pass" if d.verify(idx=idx, dnsfunc=stub_dns(records)) else "fail"
    except dkim.DKIMException as exc:
        return f"invalid: {exc}"


def records_for(*keys: SigningKey) -> dict[str, str]:
    return {k.dns_name: k.dns_record() for k in keys}


def sign(
    keys: Sequence[SigningKey],
    policy: SigningPolicy,
    message: bytes,
    now: int = NOW,
    chunks: Callable[[bytes], Iterable[bytes]] | None = None,
) -> list[bytes]:
    fields, body = split_message(message)
    signer = MessageSigner(keys, policy, now)
    for chunk in chunks(body) if chunks else [body]:
        signer.update(chunk)
    return signer.sign(fields)


def policy(
    c: str = "relaxed/relaxed",
    sign_headers: Sequence[str] = ("from", "to", "cc", "subject", "date", "message-id"),
    oversign: Iterable[str] = ("from", "to", "cc", "subject"),
    expire_after: int | None = None,
) -> SigningPolicy:
    return SigningPolicy(
        Canonicalization.parse(c), tuple(sign_headers), frozenset(oversign), expire_after
    )


def insert_after_signatures(message: bytes, field: bytes) -> bytes:
    """Put `field` on top of the original header (below our DKIM-Signature fields)."""
    at = message.index(b"From:")
    return message[:at] + field + message[at:]


HEADER = (
    b"From: Joe SixPack <joe@example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@example.com>\r\n"
    b"X-Unsigned: whatever\r\n"
)
BODY = b"Hi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n"
MESSAGE = HEADER + CRLF + BODY


# --- keys ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa1024() -> SigningKey:
    return SigningKey.load("example.com", "rsa1024", generate_key(Algorithm.RSA_SHA256, 1024))


@pytest.fixture(scope="module")
def rsa2048() -> SigningKey:
    return SigningKey.load("example.com", "rsa2048", generate_key(Algorithm.RSA_SHA256, 2048))


@pytest.fixture(scope="module")
def ed() -> SigningKey:
    return SigningKey.load("example.com", "ed", generate_key(Algorithm.ED25519_SHA256))


@pytest.fixture(scope="module")
def keys(rsa1024: SigningKey, rsa2048: SigningKey, ed: SigningKey) -> dict[str, SigningKey]:
    return {"rsa1024": rsa1024, "rsa2048": rsa2048, "ed25519": ed}


# --- RFC 8463 Appendix A -------------------------------------------------------------------------

RFC_SIGNED = (VECTORS / "rfc8463_a3_signed.eml").read_bytes()
RFC_UNSIGNED = RFC_SIGNED[RFC_SIGNED.index(b"From: Joe") :]
RFC_BH = "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
RFC_T = 1528637909


def rfc_dns() -> dict[str, str]:
    zone = (VECTORS / "rfc8463_a2_dns.zone").read_text()
    return {
        m.group(1): "".join(re.findall(r'"([^"]*)"', m.group(2)))
        for m in re.finditer(r"(\S+)\. IN TXT \((.*?)\)", zone, re.S)
    }


def rfc_keys() -> tuple[SigningKey, SigningKey]:
    ed = SigningKey.load(
        "football.example.com", "brisbane", (VECTORS / "rfc8463_a1_ed25519.seed").read_bytes()
    )
    rs = SigningKey.load(
        "football.example.com", "test", (VECTORS / "rfc8463_a1_rsa.pem").read_bytes()
    )
    return ed, rs


def test_rfc8463_published_signatures_verify_with_the_stub() -> None:
    # Checks the transcription of A.2/A.3 and the DNS stub before they are used below.
    assert verify(RFC_SIGNED, rfc_dns(), 0) == "pass"
    assert verify(RFC_SIGNED, rfc_dns(), 1) == "pass"
    assert verify(RFC_SIGNED.replace(b"hungry", b"angry"), rfc_dns(), 0).startswith("invalid")


@pytest.mark.parametrize("chunk", [None, 1, 2, 7])
def test_rfc8463_body_hash(chunk: int | None) -> None:
    body = split_message(RFC_UNSIGNED)[1]
    h = BodyHasher(Canon.RELAXED)
    for i in range(0, len(body), chunk or len(body)):
        h.update(body[i : i + (chunk or len(body))])
    assert base64.b64encode(h.digest()).decode() == RFC_BH


def test_rfc8463_sign_digest_reproduces_the_published_b() -> None:
    """Both algorithms are deterministic, so the RFC's own header data (its h= list, its
    DKIM-Signature with b= emptied, relaxed canonicalization) signed with the RFC's keys must give
    the published b= byte for byte: this pins canon_header_relaxed on folded fields and
    SigningKey.sign_digest (Ed25519 signs the SHA-256 digest itself, RFC 8463 §3)."""
    fields, _ = split_message(RFC_SIGNED)
    sigs = [f.raw for f in fields if f.name == "dkim-signature"]
    for sig, key in zip(sigs, rfc_keys(), strict=True):
        tags = tags_of(sig)
        used: dict[str, int] = {}
        data = b""
        for name in tags["h"].lower().split(":"):  # RFC 6376 §5.4.2: bottom-up, absent = nothing
            same = [f.raw for f in fields if f.name == name]
            used[name] = used.get(name, 0) + 1
            if used[name] <= len(same):
                data += canon_header_relaxed(same[-used[name]])
        emptied = re.sub(rb"(\sb=)[A-Za-z0-9+/=\s]*$", rb"\1", sig)
        data += canon_header_relaxed(emptied + CRLF)[:-2]
        b = base64.b64encode(key.sign_digest(hashlib.sha256(data).digest())).decode()
        assert b == tags["b"], key.algorithm


def test_rfc8463_our_signatures_verify_with_the_rfc_dns_records() -> None:
    ed, rs = rfc_keys()
    pol = policy(
        sign_headers=("from", "to", "subject", "date", "message-id"),
        oversign=("from", "subject", "date"),
    )
    ours = sign([ed, rs], pol, RFC_UNSIGNED, now=RFC_T)
    signed = b"".join(ours) + RFC_UNSIGNED
    assert verify(signed, rfc_dns(), 0) == "pass"
    assert verify(signed, rfc_dns(), 1) == "pass"
    rfc_tags = tags_of(split_message(RFC_SIGNED)[0][0].raw)
    for field, key in zip(ours, (ed, rs), strict=True):
        t = tags_of(field)
        assert (t["a"], t["c"], t["d"], t["s"], t["t"], t["bh"]) == (
            key.algorithm.value,
            "relaxed/relaxed",
            "football.example.com",
            key.selector,
            str(RFC_T),
            RFC_BH,
        )
        assert sorted(t["h"].split(":")) == sorted(rfc_tags["h"].split(":"))
    # Our Ed25519 b= is not the RFC's, though Ed25519 is deterministic and key, t=, c=, bh= and the
    # multiset of h= names are the same: the RFC's field also carries i= and q=, lists h= as
    # from:to:subject:date:message-id:from:subject:date where we group each name with its
    # oversigned repeat (from:from:to:subject:subject:date:date:message-id), and folds and spaces
    # differently ("h=from : to :"); the signed header data differs, so the signature does.
    # test_rfc8463_sign_digest_reproduces_the_published_b checks the byte-for-byte part.
    assert tags_of(ours[0])["h"] == "from:from:to:subject:subject:date:date:message-id"
    assert tags_of(ours[0])["b"] != rfc_tags["b"]


# --- every key type, every c= ------------------------------------------------------------------


@pytest.mark.parametrize("c", ALL_C)
@pytest.mark.parametrize("key_name", ["rsa1024", "rsa2048", "ed25519"])
def test_signature_verifies(keys: dict[str, SigningKey], key_name: str, c: str) -> None:
    key = keys[key_name]
    (field,) = sign([key], policy(c), MESSAGE)
    assert verify(field + MESSAGE, records_for(key)) == "pass"
    t = tags_of(field)
    assert (t["v"], t["a"], t["c"], t["d"], t["s"], t["t"]) == (
        "1",
        key.algorithm.value,
        c,
        "example.com",
        key.selector,
        str(NOW),
    )
    assert len(base64.b64decode(t["b"], validate=True)) == (key.bits // 8 if key.bits > 256 else 64)


def test_rsa4096_signature_verifies() -> None:
    key = SigningKey.load("example.com", "rsa4096", generate_key(Algorithm.RSA_SHA256, 4096))
    (field,) = sign([key], policy(), MESSAGE)
    assert verify(field + MESSAGE, records_for(key)) == "pass"


def test_dual_signing_both_verify(rsa2048: SigningKey, ed: SigningKey) -> None:
    fields = sign([rsa2048, ed], policy(), MESSAGE)
    assert [tags_of(f)["a"] for f in fields] == ["rsa-sha256", "ed25519-sha256"]
    assert tags_of(fields[0])["bh"] == tags_of(fields[1])["bh"]
    signed = b"".join(fields) + MESSAGE
    assert verify(signed, records_for(rsa2048, ed), 0) == "pass"
    assert verify(signed, records_for(rsa2048, ed), 1) == "pass"


def test_signer_output_shape(ed: SigningKey) -> None:
    (field,) = sign([ed], policy(), MESSAGE)
    assert field.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256; ")
    assert field.endswith(CRLF) and not field.endswith(CRLF + CRLF)
    assert b"\n" not in field.replace(CRLF, b"") and b"\r" not in field.replace(CRLF, b"")
    # every continuation line starts with WSP: one field, not several
    assert all(line[:1] in (b" ", b"\t") for line in field[:-2].split(CRLF)[1:])
    assert list(tags_of(field)) == ["v", "a", "c", "d", "s", "t", "h", "bh", "b"]


# --- oversigning, repeated fields ---------------------------------------------------------------


@pytest.mark.parametrize(
    "extra", [b"From: Mallory <m@evil.example>\r\n", b"To: m@evil.example\r\n", b"Subject: pay\r\n"]
)
def test_adding_an_oversigned_field_breaks_the_signature(ed: SigningKey, extra: bytes) -> None:
    (field,) = sign([ed], policy(), MESSAGE)
    assert verify(field + MESSAGE, records_for(ed)) == "pass"
    assert verify(insert_after_signatures(field + MESSAGE, extra), records_for(ed)) == "fail"


@pytest.mark.parametrize("extra", [b"To: m@evil.example\r\n", b"Subject: pay\r\n"])
def test_without_oversigning_an_added_field_on_top_goes_unnoticed(
    ed: SigningKey, extra: bytes
) -> None:
    # The control for the test above: the verifier picks fields bottom-up, so a field added on
    # top is only caught by the extra h= entry. (Not for From: dkimpy always checks one From more
    # than h= lists, its fix for Debian bug 644046; test_oversigned_names_are_listed_once_more
    # checks our h= for From.)
    (field,) = sign([ed], policy(oversign=()), MESSAGE)
    assert verify(insert_after_signatures(field + MESSAGE, extra), records_for(ed)) == "pass"


def test_oversigning_an_absent_field_breaks_on_its_addition(ed: SigningKey) -> None:
    (field,) = sign([ed], policy(), MESSAGE)  # Cc is oversigned and absent
    assert "cc" in tags_of(field)["h"].split(":")
    assert (
        verify(insert_after_signatures(field + MESSAGE, b"Cc: x@evil.example\r\n"), records_for(ed))
        == "fail"
    )


def test_oversigned_names_are_listed_once_more(ed: SigningKey) -> None:
    (field,) = sign([ed], policy(), MESSAGE)
    assert tags_of(field)["h"] == "from:from:to:to:cc:subject:subject:date:message-id"


@pytest.mark.parametrize(
    "extra",
    [b"X-Foo: bar\r\n", b"Received: from somewhere\r\n", b"X-Unsigned: second\r\n"],
)
def test_adding_an_unsigned_field_keeps_the_signature(ed: SigningKey, extra: bytes) -> None:
    (field,) = sign([ed], policy(), MESSAGE)
    top = insert_after_signatures(field + MESSAGE, extra)
    bottom = (field + MESSAGE).replace(b"\r\n\r\nHi.", b"\r\n" + extra + b"\r\nHi.")
    assert verify(top, records_for(ed)) == "pass"
    assert verify(bottom, records_for(ed)) == "pass"


REPEATED = (
    b"Received: from a.example by b.example; Mon, 1 Jan 2024 00:00:03 +0000\r\n"
    b"Received: from c.example by a.example; Mon, 1 Jan 2024 00:00:02 +0000\r\n"
    b"From: joe@example.com\r\n"
    b"Received: from d.example by c.example; Mon, 1 Jan 2024 00:00:01 +0000\r\n"
    b"Subject: three hops\r\n"
    b"\r\n"
    b"body\r\n"
)


@pytest.mark.parametrize(("oversign", "count"), [((), 3), (("received",), 4)])
def test_repeated_field_signed_bottom_up(
    ed: SigningKey, oversign: tuple[str, ...], count: int
) -> None:
    pol = policy(sign_headers=("from", "received", "subject"), oversign=oversign)
    (field,) = sign([ed], pol, REPEATED)
    assert tags_of(field)["h"].split(":").count("received") == count
    assert verify(field + REPEATED, records_for(ed)) == "pass"
    # the order matters (bottom-up, RFC 6376 §5.4.2): swapping two instances breaks it
    hop1 = b"from a.example by b.example; Mon, 1 Jan 2024 00:00:03"
    hop2 = b"from c.example by a.example; Mon, 1 Jan 2024 00:00:02"
    swapped = REPEATED.replace(hop1, b"@@").replace(hop2, hop1).replace(b"@@", hop2)
    assert swapped != REPEATED
    assert verify(field + swapped, records_for(ed)) == "fail"


# --- folding ------------------------------------------------------------------------------------


def overlong(field: bytes) -> list[bytes]:
    """Lines over 78 characters (RFC 5322 §2.1.1, CRLF excluded) that could have been folded:
    a line holding a single unbreakable item (no WSP after its leading tab) is allowed."""
    return [
        line for line in field[:-2].split(CRLF) if len(line) > 78 and b" " in line.strip(b" \t")
    ]


@pytest.mark.parametrize("c", ["relaxed/relaxed", "simple/simple"])
def test_folded_lines_stay_under_78(rsa2048: SigningKey, ed: SigningKey, c: str) -> None:
    many = (
        "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc", "mime-version",
        "content-type", "content-transfer-encoding", "in-reply-to", "references", "list-id",
        "list-unsubscribe", "list-unsubscribe-post",
    )  # fmt: skip
    for key in (rsa2048, ed):
        for pol in (policy(c), policy(c, many, many, expire_after=604800)):
            fields = sign([key], pol, MESSAGE, now=int(time.time()))  # dkimpy checks x=
            assert all(len(line) <= 78 for line in fields[0][:-2].split(CRLF)), fields[0]
            assert verify(fields[0] + MESSAGE, records_for(key)) == "pass"


def test_unbreakable_items_may_exceed_78_and_still_verify() -> None:
    domain = ("d" * 60 + ".") * 2 + "example"
    key = SigningKey.load(domain, "s" * 63, (VECTORS / "rfc8463_a1_ed25519.seed").read_bytes())
    message = MESSAGE.replace(b"joe@example.com", f"joe@{domain}".encode())
    (field,) = sign([key], policy(), message)
    assert any(len(line) > 78 for line in field.split(CRLF))
    assert overlong(field) == []
    assert verify(field + message, records_for(key)) == "pass"


def test_no_foldable_line_over_78_for_any_header_list() -> None:
    key = SigningKey.load("example.com", "sel", (VECTORS / "rfc8463_a1_ed25519.seed").read_bytes())
    bad = []
    for n in range(1, 40):
        for m in range(0, 40, 2):
            names = ("from", "subject", "x-" + "a" * n) + (("x-" + "b" * m,) if m else ())
            fields = [HeaderField(name, name.encode() + b": x\r\n") for name in names]
            signer = MessageSigner([key], policy(sign_headers=names, oversign=()), NOW)
            signer.update(b"hi\r\n")
            bad += overlong(signer.sign(fields)[0])
    assert bad == []


# --- clock, expiry ----------------------------------------------------------------------------


def test_expire_after_sets_x(ed: SigningKey) -> None:
    (field,) = sign([ed], policy(expire_after=3600), MESSAGE, now=NOW)
    t = tags_of(field)
    assert (t["t"], t["x"]) == (str(NOW), str(NOW + 3600))
    (field,) = sign([ed], policy(), MESSAGE, now=NOW)
    assert "x" not in tags_of(field)


def test_expiring_signature_verifies_now(ed: SigningKey) -> None:
    now = int(time.time())  # dkimpy checks x= against the real clock
    (field,) = sign([ed], policy("simple/relaxed", expire_after=86400), MESSAGE, now=now)
    assert tags_of(field)["x"] == str(now + 86400)
    assert verify(field + MESSAGE, records_for(ed)) == "pass"


# --- golden output --------------------------------------------------------------------------------
# GOLDEN: the files tests/vectors/golden_*.sig were produced by this signer (with a fixed clock
# and the deterministic RFC 8463 keys) and checked by dkimpy; they pin the exact bytes (tag order,
# folding, b=) against regressions. The vectors are defined in tests/vectors/regenerate.py;
# regenerate them deliberately, after checking the change, with that script (never by a test):
# .venv/bin/python tests/vectors/regenerate.py


@pytest.mark.parametrize("name", sorted(golden.GOLDEN))
def test_golden_signature_bytes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    key_names, pol, verify_at = golden.GOLDEN[name]
    keys_used = [golden.keys()[k] for k in key_names]
    got = b"".join(sign(keys_used, pol, golden.MESSAGE, now=golden.NOW))
    assert got == (VECTORS / name).read_bytes()
    if verify_at is not None:
        monkeypatch.setattr(dkim.time, "time", lambda: float(verify_at))
    for i in range(len(keys_used)):
        assert verify(got + golden.MESSAGE, records_for(*keys_used), i) == "pass"


def test_golden_is_stable_under_chunking() -> None:
    key_names, pol, _ = golden.GOLDEN["golden_relaxed_dual.sig"]
    expected = (VECTORS / "golden_relaxed_dual.sig").read_bytes()
    for size in (1, 2, 3, 64):
        got = b"".join(
            sign(
                [golden.keys()[k] for k in key_names],
                pol,
                golden.MESSAGE,
                now=golden.NOW,
                chunks=lambda b, n=size: (b[i : i + n] for i in range(0, len(b), n)),
            )
        )
        assert got == expected, size


# --- tampering -----------------------------------------------------------------------------------


@pytest.mark.parametrize("c", ALL_C)
def test_changing_one_body_byte_fails(ed: SigningKey, c: str) -> None:
    (field,) = sign([ed], policy(c), MESSAGE)
    tampered = field + MESSAGE.replace(b"hungry", b"hungrY")
    assert verify(tampered, records_for(ed)).startswith("invalid: body hash mismatch")


@pytest.mark.parametrize("c", ALL_C)
@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"Subject: Is dinner ready?", b"Subject: Is dinner ready!"),
        (b"From: Joe SixPack <joe@", b"From: Joe SixPack <jOe@"),
        (b"Message-ID: <20030712040037", b"Message-ID: <20030712040038"),
    ],
)
def test_changing_one_signed_header_byte_fails(
    ed: SigningKey, c: str, old: bytes, new: bytes
) -> None:
    (field,) = sign([ed], policy(c), MESSAGE)
    assert verify(field + MESSAGE.replace(old, new), records_for(ed)) == "fail"


@pytest.mark.parametrize("c", ALL_C)
def test_changing_an_unsigned_header_passes(ed: SigningKey, c: str) -> None:
    (field,) = sign([ed], policy(c), MESSAGE)
    changed = field + MESSAGE.replace(b"X-Unsigned: whatever", b"X-Unsigned: something else")
    assert verify(changed, records_for(ed)) == "pass"


def test_changing_the_signature_field_fails(ed: SigningKey) -> None:
    (field,) = sign([ed], policy(), MESSAGE)
    assert (
        verify(field.replace(b"t=1700000000", b"t=1700000001") + MESSAGE, records_for(ed)) == "fail"
    )


WSP_CHANGES = [
    (b"Hi.\r\n", b"Hi.  \t\r\n"),  # trailing whitespace
    (b"Joe.\r\n", b"Joe.\r\n\r\n\r\n"),  # blank lines at the end
    (b"Joe.\r\n", b"Joe. \r\n \r\n\t\r\n"),  # both, with whitespace-only lines
]


@pytest.mark.parametrize(("old", "new"), WSP_CHANGES)
@pytest.mark.parametrize("c", ALL_C)
def test_whitespace_body_changes(ed: SigningKey, c: str, old: bytes, new: bytes) -> None:
    (field,) = sign([ed], policy(c), MESSAGE)
    verdict = verify(field + MESSAGE.replace(old, new), records_for(ed))
    if c.endswith("/relaxed"):
        assert verdict == "pass"  # relaxed body canon forgives these (RFC 6376 §3.4.4)
    elif new == b"Joe.\r\n\r\n\r\n":
        assert verdict == "pass"  # simple drops trailing empty lines too (§3.4.3)
    else:
        assert verdict.startswith("invalid: body hash mismatch")


# --- 8-bit and folded header fields ------------------------------------------------------------

HEADER_8BIT = (
    b"From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\n"
    b"To: Zo\xc3\xab \xc5\x81ukasiewicz <zoe@example.net>\r\n"
    b"Subject: Zam\xc3\xb3wienie #42 \xe2\x80\x94 potwierdzenie\r\n"
    b"\tdruga  linia\r\n"
    b"   trzecia linia \r\n"
    b"X-Raw: \xff\xfe\r\n"
    b"\r\n"
    b"Dzi\xc4\x99kujemy!\r\n"
)


@pytest.mark.parametrize("c", ALL_C)
def test_8bit_and_folded_fields_verify(rsa1024: SigningKey, ed: SigningKey, c: str) -> None:
    pol = policy(c, ("from", "to", "subject", "x-raw"), ("from",))
    fields = sign([rsa1024, ed], pol, HEADER_8BIT)
    signed = b"".join(fields) + HEADER_8BIT
    assert verify(signed, records_for(rsa1024, ed), 0) == "pass"
    assert verify(signed, records_for(rsa1024, ed), 1) == "pass"
    refolded = signed.replace(
        b"potwierdzenie\r\n\tdruga  linia\r\n   trzecia", b"potwierdzenie druga\r\n linia trzecia"
    )
    assert refolded != signed
    expected = "pass" if c.startswith("relaxed/") else "fail"
    assert verify(refolded, records_for(rsa1024, ed), 1) == expected
    tampered = signed.replace(b"\xff\xfe", b"\xff\xff")
    assert verify(tampered, records_for(rsa1024, ed), 1) == "fail"


# --- streaming: the chunking never shows in the signature ---------------------------------------


@settings(max_examples=60)
@given(
    body=st.lists(
        st.sampled_from([b"a", b"bc ", b" ", b"\t", b"\r\n", b"\r", b"\xc3\xa9", b"  \r\n"]),
        max_size=40,
    ).map(b"".join),
    subject=st.lists(
        st.sampled_from([b"x", b" ", b"\t", b"\r\n ", b"\r\n\t", b"\xe2\x82\xac", b"!"]),
        min_size=1,
        max_size=10,
    ).map(b"".join),
    c=st.sampled_from(ALL_C),
    cuts=st.lists(st.integers(0, 200), max_size=6),
)
def test_generated_messages_verify_and_chunking_is_invisible(
    body: bytes, subject: bytes, c: str, cuts: list[int]
) -> None:
    # Ed25519 is deterministic: the same message gives the same bytes whatever the chunking.
    # (Bodies have no bare LF: dkimpy's message parser turns it into CRLF; RFC 6376 does not.)
    # Nor an unterminated last line ending in WSP: RFC 6376 §3.4.4 (a) strips that WSP, dkimpy
    # keeps it (test_canon.py::test_relaxed_unterminated_last_line_loses_trailing_wsp). Through
    # SMTP a body always ends with CRLF, so real mail never shows the difference.
    if body[-1:] in (b" ", b"\t"):
        body += b"."
    key = golden.keys()["ed"]
    message = b"From: a@example.com\r\nSubject:" + subject + b"\r\nTo: b@example.com\r\n\r\n" + body

    def chunked(b: bytes) -> list[bytes]:
        points = sorted({min(x, len(b)) for x in cuts})
        return [b[i:j] for i, j in zip([0, *points], [*points, len(b)], strict=True)]

    whole = sign([key], policy(c), message)
    assert sign([key], policy(c), message, chunks=chunked) == whole
    assert verify(whole[0] + message, records_for(key)) == "pass"


# --- policy checks -------------------------------------------------------------------------------


def test_policy_must_sign_from() -> None:
    with pytest.raises(ValueError, match="From"):
        policy(sign_headers=("to", "subject"), oversign=())


def test_signer_needs_a_key() -> None:
    with pytest.raises(ValueError, match="no signing keys"):
        MessageSigner([], policy(), NOW)
