"""The MTA side of the milter protocol (version 6), byte-exact: `dkim-sidecar probe`, the tests
and the benchmark drive a running milter with it as Postfix would.

Only what an MTA needs to push one message through and read the modifications back; the
framing is `uint32 length, command char, data` (libmilter's mfdef.h, Postfix milter8.c).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .address import Listen
from .codec import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    CHUNK,
    P_HDR_LEADSPC,
    P_NOBODY,
    P_NOCONNECT,
    P_NODATA,
    P_NOEOH,
    P_NOHDRS,
    P_NOHELO,
    P_NOMAIL,
    P_NORCPT,
    P_NR_BODY,
    P_NR_CONN,
    P_NR_DATA,
    P_NR_EOH,
    P_NR_HDR,
    P_NR_HELO,
    P_NR_MAIL,
    P_NR_RCPT,
    R_INSHEADER,
    STAGE_CODES,
    ProtocolError,
    packet,
    parse_insert_header,
)


@dataclass
class Result:
    """How a message went: the final reply and the header insertions."""

    action: str  # "accept", "continue", "tempfail", "reject", "discard", ...
    stage: str  # where the milter decided: connect, mail, eoh, body, eom
    inserted: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (index, name, value)
    added: list[tuple[bytes, bytes]] = field(default_factory=list)
    message: bytes = b""  # the message with the modifications applied (CRLF)

    @property
    def signatures(self) -> list[bytes]:
        return [v for _, n, v in self.inserted if n.lower() == b"dkim-signature"] + [
            v for n, v in self.added if n.lower() == b"dkim-signature"
        ]


_REPLIES = {
    b"a": "accept",
    b"c": "continue",
    b"t": "tempfail",
    b"r": "reject",
    b"d": "discard",
    b"y": "replycode",
    b"s": "skip",
    b"q": "quarantine",
}


def parse_address(text: str) -> tuple[int, object]:
    """(family, address) to connect to a milter at `inet:HOST:PORT`, `inet6:[ADDR]:PORT`,
    `unix:/path` (address.Listen's spelling), or a plain `HOST:PORT` or `[ADDR]:PORT`."""
    if not text.startswith(("inet:", "inet6:", "unix:")):
        text = ("inet6:" if text.startswith("[") else "inet:") + text
    return Listen.parse(text).connect_to()


def split_header(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(name, value) pairs as Postfix sends them (value after the colon, folds as LF) and the
    body; the message must have CRLF line ends."""
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        head, body = message, b""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
        elif b":" in line:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields, body


class MilterClient:
    """One milter connection, as an MTA sees it."""

    def __init__(self, address: str, timeout: float = 30.0, source: str | None = None) -> None:
        """Connect to `address` (inet:HOST:PORT, inet6:[ADDR]:PORT, unix:/path), from the
        local address `source` when given (the milter sees it as the MTA's address)."""
        family, addr = parse_address(address)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect(addr)  # type: ignore[arg-type]
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self.protocol = 0
        self.actions = 0
        self.macros: dict[str, list[str]] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- framing -------------------------------------------------------------------------

    def _send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(packet(cmd, data))

    def _recv(self) -> tuple[bytes, bytes]:
        while True:
            while len(self._buf) < 4:
                self._fill()
            (size,) = struct.unpack("!I", self._buf[:4])
            while len(self._buf) < 4 + size:
                self._fill()
            frame, self._buf = self._buf[4 : 4 + size], self._buf[4 + size :]
            if frame[:1] != b"p":  # progress: keep waiting
                return frame[:1], frame[1:]

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ProtocolError("milter closed the connection")
        self._buf += data

    def _reply(self) -> str:
        cmd, _data = self._recv()
        if cmd not in _REPLIES:
            raise ProtocolError(f"unexpected reply {cmd!r}")
        return _REPLIES[cmd]

    # --- commands ------------------------------------------------------------------------

    def negotiate(self, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> None:
        self._send(b"O", struct.pack("!III", 6, actions, protocol))
        cmd, data = self._recv()
        if cmd != b"O" or len(data) < 12:
            raise ProtocolError(f"bad option negotiation reply {cmd!r}")
        _, self.actions, self.protocol = struct.unpack("!III", data[:12])
        rest = data[12:]
        while len(rest) >= 4:  # setsymlist: (uint32 stage, "macro list\0") pairs
            (stage,) = struct.unpack("!I", rest[:4])
            text, _, rest = rest[4:].partition(b"\0")
            self.macros[STAGE_CODES.get(stage, str(stage))] = text.decode().split()

    def macro(self, stage: str, values: Mapping[str, str]) -> None:
        if values:
            data = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in values.items())
            self._send(b"D", stage.encode() + data)

    def connect(self, ip: str, hostname: str = "client.example", port: int = 40000) -> str:
        if self.protocol & P_NOCONNECT:
            return "continue"
        fam = b"6" if ":" in ip else b"4"
        self._send(
            b"C", hostname.encode() + b"\0" + fam + struct.pack("!H", port) + ip.encode() + b"\0"
        )
        return "continue" if self.protocol & P_NR_CONN else self._reply()

    def helo(self, name: str = "client.example") -> str:
        if self.protocol & P_NOHELO:
            return "continue"
        self._send(b"H", name.encode() + b"\0")
        return "continue" if self.protocol & P_NR_HELO else self._reply()

    def mail(self, sender: bytes, macros: Mapping[str, str] | None = None) -> str:
        self.macro("M", macros or {})
        if self.protocol & P_NOMAIL:
            return "continue"
        self._send(b"M", b"<" + sender + b">\0")
        return "continue" if self.protocol & P_NR_MAIL else self._reply()

    def rcpt(self, rcpt: bytes) -> str:
        if self.protocol & P_NORCPT:
            return "continue"
        self._send(b"R", b"<" + rcpt + b">\0")
        return "continue" if self.protocol & P_NR_RCPT else self._reply()

    def data(self) -> str:
        if self.protocol & P_NODATA:
            return "continue"
        self._send(b"T")
        return "continue" if self.protocol & P_NR_DATA else self._reply()

    def header(self, name: bytes, value: bytes) -> str:
        if self.protocol & P_NOHDRS:
            return "continue"
        if not self.protocol & P_HDR_LEADSPC:
            value = value.lstrip(b" ")  # what Postfix does without SMFIP_HDR_LEADSPC
        self._send(b"L", name + b"\0" + value + b"\0")
        return "continue" if self.protocol & P_NR_HDR else self._reply()

    def eoh(self, macros: Mapping[str, str] | None = None) -> str:
        self.macro("N", macros or {})
        if self.protocol & P_NOEOH:
            return "continue"
        self._send(b"N")
        return "continue" if self.protocol & P_NR_EOH else self._reply()

    def body(self, chunk: bytes) -> str:
        if self.protocol & P_NOBODY:
            return "continue"
        self._send(b"B", chunk)
        return "continue" if self.protocol & P_NR_BODY else self._reply()

    def eom(self, macros: Mapping[str, str] | None = None) -> tuple[str, Result]:
        self.macro("E", macros or {})
        self._send(b"E")
        result = Result("continue", "eom")
        while True:
            cmd, data = self._recv()
            if cmd == R_INSHEADER:
                result.inserted.append(parse_insert_header(data))
            elif cmd == b"h":
                name, value = data.rstrip(b"\0").split(b"\0", 1)
                result.added.append((name, value))
            elif cmd in _REPLIES:
                result.action = _REPLIES[cmd]
                return result.action, result
            else:
                raise ProtocolError(f"unexpected end-of-message reply {cmd!r}")

    def abort(self) -> None:
        self._send(b"A")

    def quit(self) -> None:
        self._send(b"Q")

    # --- one whole message ---------------------------------------------------------------

    def send_message(
        self,
        message: bytes,
        sender: bytes = b"sender@example.com",
        rcpts: Iterable[bytes] = (b"rcpt@example.net",),
        *,
        auth: str | None = None,
        queue_id: str = "4ABCDEF",
        chunk: int = CHUNK,
    ) -> Result:
        """MAIL to end of message; the connect must have been sent already."""
        macros = {"i": queue_id}
        if auth:
            macros["{auth_authen}"] = auth
        r = self.mail(sender, macros)
        if r != "continue":
            return Result(r, "mail", message=message)
        for rc in rcpts:
            self.rcpt(rc)
        r = self.data()
        if r != "continue":
            return Result(r, "data", message=message)
        fields, body = split_header(message)
        for name, value in fields:
            r = self.header(name, value)
            if r != "continue":
                return Result(r, "header", message=message)
        r = self.eoh({"i": queue_id})
        if r != "continue":
            return Result(r, "eoh", message=message)
        for i in range(0, len(body), chunk):
            r = self.body(body[i : i + chunk])
            if r != "continue":
                return Result(r, "body", message=message)
        _, result = self.eom({"i": queue_id})
        result.message = apply_changes(message, result, bool(self.protocol & P_HDR_LEADSPC))
        return result


def apply_changes(message: bytes, result: Result, leadspc: bool) -> bytes:
    """The message as the MTA would pass it on after the milter's header changes."""

    def field_bytes(name: bytes, value: bytes) -> bytes:
        sep = b":" if leadspc else b": "
        return name + sep + value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"

    head, _sep, body = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    for idx, name, value in result.inserted:
        fields.insert(min(idx, len(fields)), field_bytes(name, value))
    for name, value in result.added:
        fields.append(field_bytes(name, value))
    return b"".join(fields) + b"\r\n" + body
