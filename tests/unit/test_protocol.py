"""The milter protocol codec (milter/codec.py): pure functions, checked against packets built by
hand from libmilter's mfdef.h layout, and against the independent PyPI package miltertest."""

from __future__ import annotations

import struct

import pytest

from dkim_sidecar.milter import codec as p


def connect_data(family: bytes, address: bytes, host: bytes = b"client.example") -> bytes:
    return host + b"\0" + family + struct.pack("!H", 25) + address + b"\0"


@pytest.mark.parametrize(
    ("family", "address", "expected"),
    [
        (b"4", b"192.0.2.10", "192.0.2.10"),
        (b"6", b"2001:db8::25", "2001:db8::25"),
        (b"6", b"IPv6:2001:db8::25", "2001:db8::25"),  # Sendmail's spelling
        (b"6", b"2001:0DB8:0:0::25", "2001:db8::25"),  # one spelling for the relay check
        (b"6", b"::ffff:192.0.2.10", "::ffff:192.0.2.10"),  # matched as IPv4 by the relay check
        (b"4", b"::ffff:192.0.2.10", None),  # not the family announced
        (b"6", b"192.0.2.10", None),
        (b"4", b"192.0.2.10.evil.example", None),
        (b"4", b"192.0.2.010", None),  # leading zeros: ambiguous (octal?), refused
        (b"6", b"fe80::1%eth0", None),  # a zone is no client address
        (b"4", b"", None),
        (b"L", b"/var/run/sock", None),
        (b"X", b"192.0.2.10", None),
    ],
)
def test_parse_connect(family: bytes, address: bytes, expected: str | None) -> None:
    assert p.parse_connect(connect_data(family, address)) == expected


def test_parse_connect_unknown_family_and_garbage() -> None:
    assert p.parse_connect(b"host\0U") is None
    with pytest.raises(p.ProtocolError):
        p.parse_connect(b"no family at all")
    with pytest.raises(p.ProtocolError):
        p.parse_connect(b"host\0")


def test_parse_macros() -> None:
    assert p.parse_macros(b"M{auth_authen}\0alice\0i\0Q1\0") == (
        ord("M"),
        {"{auth_authen}": "alice", "i": "Q1"},
    )
    assert p.parse_macros(b"E") == (ord("E"), {})
    _, values = p.parse_macros(b"Mj\0\xff\0")  # never signed: decoded with replacement
    assert values == {"j": "\ufffd"}
    with pytest.raises(p.ProtocolError):
        p.parse_macros(b"")


def test_parse_header_is_two_c_strings() -> None:
    assert p.parse_header(b"Subject\0 hi\n\tthere\0") == (b"Subject", b" hi\n\tthere")
    assert p.parse_header(b"Subject\0 before\0after\0") == (b"Subject", b" before")
    assert p.parse_header(b"X\0\0") == (b"X", b"")
    for bad in (b"Subject", b"Subject\0 no end"):
        with pytest.raises(p.ProtocolError):
            p.parse_header(bad)


def test_first_arg() -> None:
    assert p.first_arg(b"<a@example.com>\0SIZE=100\0") == b"a@example.com"
    assert p.first_arg(b"<>\0") == b""


def test_negotiate_reply_layout() -> None:
    data = p.negotiate_reply(0x101, 0x80, {2: "{auth_authen}", 5: "i"})
    (size,) = struct.unpack("!I", data[:4])
    assert size == len(data) - 4 and data[4:5] == b"O"
    assert struct.unpack("!III", data[5:17]) == (6, 0x101, 0x80)
    assert data[17:] == struct.pack("!I", 2) + b"{auth_authen}\0" + struct.pack("!I", 5) + b"i\0"
    assert p.parse_negotiate(data[5:17]) == (6, 0x101, 0x80)
    with pytest.raises(p.ProtocolError):
        p.parse_negotiate(b"\0" * 11)


def test_packets_decode_with_an_independent_codec() -> None:
    """miltertest (PyPI) reads what we write."""
    from miltertest import codec, constants

    data = p.insert_header(0, b"DKIM-Signature", b" v=1;\n\tb=x")
    assert p.parse_insert_header(data[5:]) == (0, b"DKIM-Signature", b" v=1;\n\tb=x")
    cmd, fields, rest = codec.decode_msg(data)
    assert rest == b"" and cmd == constants.SMFIR_INSHEADER
    assert fields == {"index": 0, "name": "DKIM-Signature", "value": " v=1;\n\tb=x"}
    assert codec.decode_msg(p.REPLY_ACCEPT)[0][0] == constants.SMFIR_ACCEPT
    assert codec.decode_msg(p.REPLY_TEMPFAIL)[0][0] == constants.SMFIR_TEMPFAIL


def test_constants_agree_with_an_independent_table() -> None:
    """Our values against miltertest's (from libmilter's mfdef.h/mfapi.h): both sides of our
    tests share milter/codec.py, so a swapped flag would otherwise only show through Postfix."""
    from miltertest import constants as c

    flags = {name: value for name, value in vars(p).items() if name.startswith("P_")}
    assert len(flags) == 21
    for name, value in flags.items():
        assert getattr(c, "SMFIP_" + name[2:]) == value, name
    assert (c.SMFIF_ADDHDRS, c.SMFIF_SETSYMLIST) == (p.F_ADDHDRS, p.F_SETSYMLIST)
    stages = ("CONNECT", "HELO", "ENVFROM", "ENVRCPT", "DATA", "EOM", "EOH")
    for stage in stages:
        assert getattr(c, "SMFIM_" + stage) == getattr(p, "M_" + stage), stage
    for stage, code in p.STAGE_CODES.items():  # the command whose macros a stage holds
        command = {"CONNECT": "CONNECT", "HELO": "HELO", "ENVFROM": "MAIL", "ENVRCPT": "RCPT",
                   "DATA": "DATA", "EOM": "BODYEOB", "EOH": "EOH"}[stages[stage]]  # fmt: skip
        assert getattr(c, "SMFIC_" + command) == code, stage
    commands = {"ABORT": "ABORT", "BODY": "BODY", "CONNECT": "CONNECT", "MACRO": "MACRO",
                "EOM": "BODYEOB", "HELO": "HELO", "QUIT_NC": "QUIT_NC", "HEADER": "HEADER",
                "MAIL": "MAIL", "EOH": "EOH", "OPTNEG": "OPTNEG", "QUIT": "QUIT",
                "RCPT": "RCPT", "DATA": "DATA"}  # fmt: skip
    for ours, theirs in commands.items():
        assert ord(getattr(c, "SMFIC_" + theirs)) == getattr(p, "C_" + ours), ours
    replies = {"ACCEPT": p.R_ACCEPT, "CONTINUE": p.R_CONTINUE, "TEMPFAIL": p.R_TEMPFAIL,
               "INSHEADER": p.R_INSHEADER}  # fmt: skip
    for name, value in replies.items():
        assert getattr(c, "SMFIR_" + name).encode() == value, name
