"""The Sendmail milter protocol, version 6: constants and pure encoders/decoders, no I/O.

Both sides use it: the server (connection.py, server.py) that Postfix talks to, and the MTA-side
client (client.py) that `dkim-sidecar probe`, the tests and the benchmark drive it with. Every
packet is `uint32 length (network order), one command octet, data`; strings are
NUL-terminated. The values are libmilter's (mfdef.h); the MTA side is Postfix's milter8.c.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping

VERSION = 6

# SMFIP_*: what the MTA may leave out, and which events get no reply
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 0x1, 0x2, 0x4, 0x8
P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = 0x10, 0x20, 0x40, 0x80
P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
P_HDR_LEADSPC = 0x100000
ALL_PROTOCOL = 0x1FFFFF

# SMFIF_*: what the milter may do to the message
F_ADDHDRS, F_SETSYMLIST = 0x1, 0x100
ALL_ACTIONS = 0x1FF

# SMFIM_*: the stages a macro list (SMFIR_SETSYMLIST, sent with the negotiation reply) is for
# (mfapi.h: CONNECT 0, HELO 1, ENVFROM 2, ENVRCPT 3, DATA 4, EOM 5, EOH 6), and the command
# whose SMFIC_MACRO packet carries that stage's macros
M_CONNECT, M_HELO, M_ENVFROM, M_ENVRCPT, M_DATA, M_EOM, M_EOH = range(7)
STAGE_CODES = {0: "C", 1: "H", 2: "M", 3: "R", 4: "T", 5: "E", 6: "N"}

CHUNK = 65535  # MILTER_CHUNK_SIZE: the largest body chunk an MTA sends

# SMFIC_* commands (MTA to milter)
C_ABORT, C_BODY, C_CONNECT, C_MACRO = ord("A"), ord("B"), ord("C"), ord("D")
C_EOM, C_HELO, C_QUIT_NC, C_HEADER = ord("E"), ord("H"), ord("K"), ord("L")
C_MAIL, C_EOH, C_OPTNEG, C_QUIT = ord("M"), ord("N"), ord("O"), ord("Q")
C_RCPT, C_DATA, C_UNKNOWN = ord("R"), ord("T"), ord("U")

# SMFIR_* replies (milter to MTA)
R_ACCEPT, R_CONTINUE, R_TEMPFAIL = b"a", b"c", b"t"
R_INSHEADER = b"i"


class ProtocolError(Exception):
    """A packet that does not follow the protocol: the connection cannot go on."""


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


# Replies without data are the same few bytes every time.
REPLY_ACCEPT = packet(R_ACCEPT)
REPLY_CONTINUE = packet(R_CONTINUE)
REPLY_TEMPFAIL = packet(R_TEMPFAIL)


def negotiate_reply(actions: int, protocol: int, macros: Mapping[int, str]) -> bytes:
    """SMFIC_OPTNEG answered: our version, actions and protocol flags, then for each stage the
    macros we want there (uint32 stage, "names\\0"), which Postfix honours over its own
    milter_*_macros settings."""
    data = struct.pack("!III", VERSION, actions, protocol)
    for stage, names in sorted(macros.items()):
        data += struct.pack("!I", stage) + names.encode("ascii") + b"\0"
    return packet(b"O", data)


def parse_negotiate(data: bytes) -> tuple[int, int, int]:
    """(version, actions, protocol) the MTA offers."""
    if len(data) < 12:
        raise ProtocolError(f"option negotiation of {len(data)} octets (expected 12)")
    version, actions, protocol = struct.unpack_from("!III", data)
    return version, actions, protocol


def parse_macros(data: bytes) -> tuple[int, dict[str, str]]:
    """SMFIC_MACRO: the command octet the macros belong to, and name -> value.

    Values are decoded as UTF-8 with replacement: they are read (queue ID, SASL login), never
    signed."""
    if not data:
        raise ProtocolError("macro packet without a command")
    parts = data[1:].split(b"\0")
    values = {}
    for i in range(0, len(parts) - 1, 2):
        values[parts[i].decode("utf-8", "replace")] = parts[i + 1].decode("utf-8", "replace")
    return data[0], values


def parse_connect(data: bytes) -> str | None:
    """SMFIC_CONNECT: the client's IP address as the MTA reports it, or None when there is no
    usable one: a unix socket, an unknown family, or an address that is not exactly of the
    announced family (as libmilter, which parses it with inet_pton for that family).

    Layout: hostname\\0, family ('4', '6', 'L', 'U'), then for 4/6/L a uint16 port and the
    address\\0. Sendmail writes IPv6 addresses with an "IPv6:" prefix; Postfix without."""
    host_end = data.find(b"\0")
    if host_end < 0 or len(data) < host_end + 2:
        raise ProtocolError("connect packet without a family")
    family = data[host_end + 1 : host_end + 2]
    if family not in (b"4", b"6"):
        return None
    text = data[host_end + 4 :].split(b"\0", 1)[0].decode("ascii", "replace")
    if family == b"6" and text[:5].lower() == "ipv6:":
        text = text[5:]
    af = socket.AF_INET if family == b"4" else socket.AF_INET6
    # inet_pton is strict (a dotted quad without leading zeros; no zone such as fe80::1%eth0,
    # which is no client address) and far cheaper than ipaddress; inet_ntop then gives one
    # spelling per address for the relay check and the log
    try:
        return socket.inet_ntop(af, socket.inet_pton(af, text))
    except (OSError, ValueError):
        return None


def parse_header(data: bytes) -> tuple[bytes, bytes]:
    """SMFIC_HEADER: name\\0value\\0, the value as the MTA holds it (folds as LF). Both are C
    strings: a value ends at its first NUL, as libmilter reads it (Postfix never sends one)."""
    name, sep, rest = data.partition(b"\0")
    value, sep2, _ = rest.partition(b"\0")
    if not sep or not sep2:
        raise ProtocolError("header packet is not name\\0value\\0")
    return name, value


def first_arg(data: bytes) -> bytes:
    """SMFIC_MAIL/RCPT: the address argument (without its angle brackets) before any
    ESMTP parameters."""
    return data.split(b"\0", 1)[0].strip(b"<>")


def parse_insert_header(data: bytes) -> tuple[int, bytes, bytes]:
    """SMFIR_INSHEADER's data: (index, name, value), the inverse of insert_header()."""
    (index,) = struct.unpack_from("!I", data)
    name, _, value = data[4:].rstrip(b"\0").partition(b"\0")
    return index, name, value


def insert_header(index: int, name: bytes, value: bytes) -> bytes:
    """SMFIR_INSHEADER: insert name: value at `index` (0 = topmost). The value goes as the
    MTA stores it: with SMFIP_HDR_LEADSPC it carries its own leading space; folds are LF."""
    return packet(R_INSHEADER, struct.pack("!I", index) + name + b"\0" + value + b"\0")
