"""header.py: exact-bytes header splitting, h= selection (RFC 6376 §5.4.2), the author domain
(RFC 5322 §3.6.2, RFC 7489 §3.1), DKIM-Signature tag lists (RFC 6376 §3.2)."""

from __future__ import annotations

import pytest

from dkim_sidecar.dkim.header import (
    FromResult,
    HeaderField,
    field_value,
    from_domain,
    make_field,
    select_headers,
    signed_domains,
    split_message,
    with_body_separator,
)
from dkim_sidecar.dkim.keys import parse_tag_list

# --- split_message -----------------------------------------------------------------------------


def test_split_message_keeps_folded_and_8bit_fields_byte_exact() -> None:
    head = (
        b"From: J\xc3\xb6rg <j@example.com>\r\n"
        b"Subject: a long\r\n\tsubject  line \r\n   with three lines\r\n"
        b"X-Raw: \xff\xfe\x80\r\n"
        b"To:no-space@example.com\r\n"
    )
    fields, body = split_message(head + b"\r\nbody\r\n")
    assert [f.name for f in fields] == ["from", "subject", "x-raw", "to"]
    assert b"".join(f.raw for f in fields) == head
    assert fields[1].raw == b"Subject: a long\r\n\tsubject  line \r\n   with three lines\r\n"
    assert body == b"body\r\n"


def test_split_message_body_starts_right_after_the_blank_line() -> None:
    fields, body = split_message(b"From: a@example.com\r\n\r\n\r\n  indented\r\nx")
    assert [f.raw for f in fields] == [b"From: a@example.com\r\n"]
    assert body == b"\r\n  indented\r\nx"


@pytest.mark.parametrize(
    "message",
    [
        b"From: a@example.com\r\nTo: b@example.com\r\n",
        b"From: a@example.com\r\nTo: b@example.com\r\n\r\n",
    ],
)
def test_split_message_without_body(message: bytes) -> None:
    fields, body = split_message(message)
    assert [f.name for f in fields] == ["from", "to"]
    assert body == b""


def test_split_message_last_field_without_crlf_gets_one() -> None:
    fields, body = split_message(b"From: a@example.com\r\nSubject: x")
    assert fields[-1] == HeaderField("subject", b"Subject: x\r\n")
    assert body == b""


def test_split_message_name_lowercased_and_wsp_before_colon_dropped() -> None:
    fields, _ = split_message(b"SUBJECT \t: x\r\nMessage-ID: <1@x>\r\n\r\n")
    assert [f.name for f in fields] == ["subject", "message-id"]
    assert fields[0].raw == b"SUBJECT \t: x\r\n"


def test_split_message_a_line_that_is_no_field_starts_the_body() -> None:
    fields, body = split_message(b"From: a@example.com\r\nthis is not a field\r\nmore\r\n")
    assert [f.name for f in fields] == ["from"]
    assert body == b"this is not a field\r\nmore\r\n"


@pytest.mark.parametrize(
    "line", [b"two words: x", b"\x7fdel: x", b": no name", b"na\xefve: x", b"\x01ctl: x"]
)
def test_split_message_a_line_whose_name_is_no_field_name_starts_the_body(line: bytes) -> None:
    """RFC 5322 §2.2: a field name is printable US-ASCII but the colon; a blank only before
    the colon (§4.5.1)."""
    fields, body = split_message(b"From: a@example.com\r\n" + line + b"\r\n")
    assert [f.name for f in fields] == ["from"]
    assert body == line + b"\r\n"


@pytest.mark.parametrize(
    ("message", "repaired"),
    [
        (b"From: a\r\nSubject: s\r\nbody line\r\n", b"From: a\r\nSubject: s\r\n\r\nbody line\r\n"),
        (b"just a body\r\n", b"\r\njust a body\r\n"),
        (b"From: a\r\n folded\r\nno field\r\n", b"From: a\r\n folded\r\n\r\nno field\r\n"),
    ],
)
def test_with_body_separator_inserts_the_empty_line_where_the_body_starts(
    message: bytes, repaired: bytes
) -> None:
    assert with_body_separator(message) == (repaired, True)
    assert with_body_separator(repaired) == (repaired, False)


@pytest.mark.parametrize(
    "message",
    [b"", b"From: a\r\n", b"From: a", b"From: a\r\n\r\nbody\r\n", b"\r\nbody\r\n", b"\r\n"],
)
def test_with_body_separator_leaves_a_well_formed_message_alone(message: bytes) -> None:
    assert with_body_separator(message) == (message, False)


def test_split_message_empty_and_headerless() -> None:
    assert split_message(b"") == ([], b"")
    assert split_message(b"\r\nonly body\r\n") == ([], b"only body\r\n")


def test_make_field_joins_name_and_value_as_given() -> None:
    assert make_field(b"Subject", b"  two spaces") == HeaderField(
        "subject", b"Subject:  two spaces\r\n"
    )
    assert make_field(b"X-8bit ", b"\xe9") == HeaderField("x-8bit", b"X-8bit :\xe9\r\n")


# --- select_headers: RFC 6376 §5.4.2 -----------------------------------------------------------


def _fields(*raw: bytes) -> list[HeaderField]:
    return split_message(b"".join(raw) + b"\r\n")[0]


def test_select_headers_repeated_field_bottom_up() -> None:
    fields = _fields(
        b"Received: 1\r\n", b"From: a@example.com\r\n", b"Received: 2\r\n", b"Received: 3\r\n"
    )
    names, chosen = select_headers(fields, ("from", "received"), frozenset())
    assert names == ["from", "received", "received", "received"]
    assert chosen == [
        b"From: a@example.com\r\n",
        b"Received: 3\r\n",
        b"Received: 2\r\n",
        b"Received: 1\r\n",
    ]


def test_select_headers_oversign_adds_one_name_and_no_field() -> None:
    fields = _fields(b"From: a@example.com\r\n", b"Subject: s\r\n")
    names, chosen = select_headers(
        fields, ("from", "to", "subject"), frozenset({"from", "to", "subject"})
    )
    # "to" is absent: not signed as a field, but listed once so that adding one breaks it
    assert names == ["from", "from", "to", "subject", "subject"]
    assert chosen == [b"From: a@example.com\r\n", b"Subject: s\r\n"]


def test_select_headers_absent_field_not_oversigned_is_not_listed() -> None:
    names, chosen = select_headers(_fields(b"From: a@x.example\r\n"), ("from", "cc"), frozenset())
    assert (names, chosen) == (["from"], [b"From: a@x.example\r\n"])


# --- from_domain --------------------------------------------------------------------------------


def _from(*values: bytes) -> FromResult:
    return from_domain(_fields(*(b"From:" + v + b"\r\n" for v in values)))


@pytest.mark.parametrize(
    ("value", "domain"),
    [
        (b" joe@Example.COM", "example.com"),
        (b" Joe SixPack <joe@football.example.com>", "football.example.com"),
        (b" Joe (the boss @evil.example) <joe@good.example>", "good.example"),
        (b" joe@good.example (Joe @evil.example)", "good.example"),
        (b' "Joe <joe@evil.example>" <joe@good.example>', "good.example"),
        (b' "a@evil.example"@good.example', "good.example"),
        (b' "Joe, @evil" <joe@good.example>', "good.example"),
        (b" J\xc3\xb6rg <j@example.com>", "example.com"),
        (b" =?utf-8?q?J=C3=B6rg?= <j@example.com>", "example.com"),
        (b" Joe\r\n <joe@folded.example>", "folded.example"),
        (b" <joe@b\xc3\xbccher.example>", "xn--bcher-kva.example"),
        (b" joe@good.example.", "good.example"),
        (b" Team: a@x.example, b@x.example;", "x.example"),
        (b" a@x.example, B <b@X.example>", "x.example"),
        (b" joe@b\xc3\xbccher.example, jane@xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_from_domain(value: bytes, domain: str) -> None:
    assert _from(value) == FromResult(domain, None)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"   ",
        b" <>",
        b" nobody",
        b" undisclosed-recipients:;",
        b" a@x.example, b@y.example",
        b" Team: a@x.example, b@y.example;",
        b" alice@evil.example)<bob@good.example>",
        b" joe@-bad.example",
        b" joe@\xff\xfe.example",
    ],
)
def test_from_domain_bad_from(value: bytes) -> None:
    assert _from(value) == FromResult(None, "bad_from")


def test_from_domain_address_literal_is_not_a_domain() -> None:
    assert _from(b" a@[192.0.2.1]") == FromResult(None, "bad_from")


def test_from_domain_no_from() -> None:
    assert from_domain(_fields(b"Sender: s@example.com\r\n")) == FromResult(None, "no_from")
    assert from_domain([]) == FromResult(None, "no_from")


def test_from_domain_two_from_fields() -> None:
    # RFC 5322 §3.6: exactly one From, even when both name the same domain
    assert _from(b" a@x.example", b" b@x.example") == FromResult(None, "multiple_from")


# --- parse_tag_list, field_value, signed_domains --------------------------------------------------


def test_parse_tag_list_unfolds_and_trims() -> None:
    tags, problems = parse_tag_list(
        b" v=1; a=rsa-sha256;\r\n\td=example.com; s = sel ;h=from\r\n :to;\r\n"
        b" bh=abc\r\n\tdef=; b=xyz\r\n uvw"
    )
    assert tags == {
        "v": b"1",
        "a": b"rsa-sha256",
        "d": b"example.com",
        "s": b"sel",
        "h": b"from :to",
        "bh": b"abc\tdef=",
        "b": b"xyz uvw",
    }
    assert problems == []


def test_parse_tag_list_skips_invalid_keeps_first_duplicate_and_names_both() -> None:
    tags, problems = parse_tag_list(b"v=1; bad tag=1; 9x=2; =3; novalue; ok =4; a=1; a=2; e=")
    assert tags == {
        "v": b"1",
        "ok": b"4",
        "a": b"1",
        "e": b"",
    }
    # a key record with these would be refused: each is named
    assert problems == [
        "'bad tag=1' is not tag=value",
        "'9x=2' is not tag=value",
        "'=3' is not tag=value",
        "'novalue' is not tag=value",
        "tag a= given twice",
    ]


def test_field_value_unfolds_and_trims() -> None:
    assert field_value(b"Subject: \t a\r\n\tb  \r\n") == b"a\tb"


SIG = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=Example.COM;\r\n"
    b"\ts=sel; t=1; h=from:to; bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b"\tb=AAAA\r\n\tBBBB\r\n"
)


def test_signed_domains_finds_a_complete_signature() -> None:
    fields = _fields(SIG, b"From: a@example.com\r\n")
    assert signed_domains(fields) == {"example.com"}


@pytest.mark.parametrize(
    "mutation",
    [
        (b"\tb=AAAA\r\n\tBBBB\r\n", b"\tz=AAAA\r\n"),  # no b=
        (b"\tb=AAAA\r\n\tBBBB\r\n", b"\tb=\r\n"),  # empty b=
        (b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;", b""),  # no bh=
        (b"v=1;", b"v=2;"),
        (b" a=rsa-sha256;", b""),
        (b"\ts=sel;", b"\t"),
        (b" d=Example.COM;", b" d=exa mple.com;"),
    ],
)
def test_signed_domains_ignores_an_incomplete_signature(mutation: tuple[bytes, bytes]) -> None:
    sig = SIG.replace(*mutation)
    assert sig != SIG
    assert signed_domains(_fields(sig, b"From: a@example.com\r\n")) == set()


def test_signed_domains_several_and_other_fields_ignored() -> None:
    other = SIG.replace(b"d=Example.COM", b"d=b\xc3\xbccher.example")
    fake = b"X-DKIM-Signature: v=1; a=rsa-sha256; d=x.example; s=s; bh=x; b=y\r\n"
    assert signed_domains(_fields(SIG, fake, other)) == {"example.com"}
    ascii_other = SIG.replace(b"d=Example.COM", b"d=mail.example.org")
    assert signed_domains(_fields(SIG, ascii_other)) == {"example.com", "mail.example.org"}
