"""One milter connection: framing, option negotiation, macros, the SMFIP_NR_* tables and the
held-reply rule. What each event means is the handler's business (api.Handler).

The packets land in one buffer (recv_into, BufferedProtocol); each is one dict lookup and one
handler call, and every reply is a single write on a TCP_NODELAY socket, so nothing waits on a
delayed ACK.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from . import codec as p
from .api import Action, Handler, Macros

if TYPE_CHECKING:
    from .server import MilterServer

__all__ = ["MilterConnection"]

log = logging.getLogger("dkim_sidecar.milter")  # the library's own, under the app's

# the SMFIP_NR_* flag that takes the reply away from each command
_NO_REPLY = {
    p.C_CONNECT: p.P_NR_CONN,
    p.C_HELO: p.P_NR_HELO,
    p.C_MAIL: p.P_NR_MAIL,
    p.C_RCPT: p.P_NR_RCPT,
    p.C_DATA: p.P_NR_DATA,
    p.C_UNKNOWN: p.P_NR_UNKN,
    p.C_HEADER: p.P_NR_HDR,
    p.C_EOH: p.P_NR_EOH,
    p.C_BODY: p.P_NR_BODY,
}

_REPLY = {
    Action.CONTINUE: p.REPLY_CONTINUE,
    Action.ACCEPT: p.REPLY_ACCEPT,
    Action.TEMPFAIL: p.REPLY_TEMPFAIL,
}
# the macro stages (by command octet) that belong to one message, cleared when it ends
_MESSAGE_STAGES = (p.C_MAIL, p.C_RCPT, p.C_DATA, p.C_EOH, p.C_EOM)
# where an event looks for a macro: its own stage, then the ones before it
_MAIL_STAGES = (p.C_MAIL, p.C_HELO, p.C_CONNECT)
_EOH_STAGES = (p.C_EOH, p.C_DATA, p.C_MAIL)
_EOM_STAGES = (p.C_EOM, p.C_EOH, p.C_DATA, p.C_MAIL)

_FIRST_SIZE = 16 * 1024  # a connection's read buffer at first: a small message fits
_READ_SIZE = 256 * 1024  # it grows up to this (more only for a larger packet)
_MIN_ROOM = 4096  # room offered to each read, at least
_HELD_BYTES = 4096  # what a peer awaiting its verdict may send (an MTA: one packet)


class _NotNegotiated:
    """The handler until option negotiation: an event that would reach a handler first (MAIL,
    header, end of header, body, end of message, abort) is a protocol error. CONNECT is let
    go (no actions agreed yet), HELO, RCPT, DATA and unknown commands get continue."""

    in_progress = False

    def __getattr__(self, name: str) -> Callable[..., Action]:
        def refuse(*args: object) -> Action:
            raise p.ProtocolError("a command before option negotiation")

        return refuse

    def close(self) -> None:
        pass


_NOT_NEGOTIATED = cast(Handler, _NotNegotiated())


class MilterConnection(asyncio.BufferedProtocol):
    """One connection from the MTA: framing, negotiation, macros; the decisions are the
    handler's."""

    def __init__(self, server: MilterServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(_FIRST_SIZE)
        self._start = 0  # the unparsed octets are _buf[_start:_end]
        self._end = 0
        self._protocol = 0  # the SMFIP_* flags agreed, 0 until negotiated
        self._can_act = False  # the MTA offers the actions the handler needs: never before
        self.handler: Handler = _NOT_NEGOTIATED  # made at option negotiation
        # each stage's last macro packet, as it came: Postfix sends one before nearly every
        # command (one per header field), and three lookups a message read a few of them
        self._macros: dict[int, bytes] = {}
        # a decision taken where no reply goes (MAIL, header, body), answered at the next reply
        self._held: Action | None = None
        self._closed = False
        # False while the peer waits for the gate's verdict: what it sends meanwhile stays in
        # the buffer unparsed (uvloop reads a new socket even when reading is paused)
        self._admitted = True
        self.peer_ip: str | None = None  # the TCP peer's address (inet listeners only)
        self.idle = 0  # sweeps since the last packet

    # --- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # each reply is one write; with Nagle on, a reply written while the MTA's ACK of
            # the previous one is still delayed would wait ~40 ms for it
            # (uvloop and asyncio set it too; test_operate reads it off the live socket)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        gate = self.server.gate
        if gate is not None and self.server.checks_peers:
            # the peer of the connection itself, never an address a packet claims; a unix
            # socket's peers are governed by its file mode
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            if not gate.allows(self.peer_ip):
                self._admitted = False  # "?" (no peer address) is never allowed: fail closed
                self.server.admit_later(self, gate)
                return
        self.server.connections.add(self)

    def admit(self) -> None:
        """The held peer may talk after all: act on what it sent while it waited."""
        self._admitted = True
        self.server.connections.add(self)
        if self.transport is not None:
            self.transport.resume_reading()
        if self._end > self._start:
            self.buffer_updated(0)

    @property
    def peer(self) -> str:
        """The MTA's end, for the rare log line that names a connection (asked only then)."""
        if self.transport is None:
            return "?"
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return "unix" if isinstance(peer, str | bytes) else "?"

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        try:
            self.handler.close()
        except Exception:
            log.exception("closing the milter handler failed")
        self.server.connections.discard(self)
        self.transport = None

    def pause_writing(self) -> None:
        # the MTA does not read our replies: stop reading its packets until it does
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    # Reading: the packets land in one buffer of ours (recv_into), are cut out of it in place
    # and copied once, into the bytes each event gets. No bytes object per read: a 256 KB read
    # into a fresh object costs page faults and a copy more than the SHA-256 of the same data.

    def get_buffer(self, sizehint: int) -> memoryview:
        start, end = self._start, self._end
        want = _MIN_ROOM
        if not self._admitted:  # a held peer's length prefix sizes nothing
            want = _HELD_BYTES + 1 - (end - start)
        elif end - start >= 4:  # a packet has begun: room for all of it
            size = int.from_bytes(self._buf[start : start + 4], "big")
            want = max(want, min(size, self.server.options.max_packet) + 4 - (end - start))
        if len(self._buf) - end < want:
            self._make_room(want)
        return memoryview(self._buf)[self._end :]

    def _make_room(self, want: int) -> None:
        """Move the unparsed octets to the front, into a larger buffer if they need one."""
        buf, start, end = self._buf, self._start, self._end
        pending = end - start
        if len(buf) - pending >= want:
            buf[:pending] = buf[start:end]  # same length: allowed while asyncio holds a view
        else:
            grown = bytearray(max(pending + want, min(2 * len(buf), _READ_SIZE)))
            grown[:pending] = buf[start:end]
            self._buf = grown  # the old one goes once no view of it is left
        self._start, self._end = 0, pending

    def buffer_updated(self, nbytes: int) -> None:
        self.idle = 0
        self._end += nbytes
        if not self._admitted:
            if self._end - self._start > _HELD_BYTES:  # not an MTA waiting for an answer
                self.server.refuse(self)
            return
        buf, pos, end = self._buf, self._start, self._end
        limit = self.server.options.max_packet
        handlers = _HANDLERS
        try:
            with memoryview(buf) as view:
                while end - pos >= 5:
                    size = int.from_bytes(view[pos : pos + 4], "big")
                    if size == 0 or size > limit:
                        raise p.ProtocolError(f"packet of {size} octets (at most {limit})")
                    stop = pos + 4 + size
                    if stop > end:
                        break
                    cmd = buf[pos + 4]
                    payload = bytes(view[pos + 5 : stop])
                    pos = stop
                    handler = handlers.get(cmd)
                    if handler is None:
                        raise p.ProtocolError(f"unknown command {cmd!r}")
                    handler(self, payload)
                    if self._closed:
                        return
        except p.ProtocolError as exc:
            log.warning(
                "milter protocol error; closing",
                extra={"fields": {"peer": self.peer, "error": str(exc)}},
            )
            self.drop()
            return
        except Exception:
            # a bug of ours: say so, and let the MTA apply its default action
            log.exception("milter connection failed")
            self.drop()
            return
        if pos == end:
            self._start = self._end = 0
            if len(buf) > _READ_SIZE:  # after one huge packet: give the memory back
                self._buf = bytearray(_FIRST_SIZE)
        else:
            self._start = pos

    # --- replies -------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    def _reply(self, cmd: int, action: Action) -> None:
        """Answer a command, unless the options agreed take its reply away (SMFIP_NR_*): then
        a decision other than continue waits for the next command that has a reply, and is
        the answer there (the message ended where it was taken)."""
        if self._protocol & _NO_REPLY.get(cmd, 0):
            if action is not Action.CONTINUE and self._held is None:
                self._held = action
            return
        if self._held is not None:
            action, self._held = self._held, None
        self._send(_REPLY[action])

    def _answer(self, cmd: int, call: Callable[[], Action]) -> None:
        """Run a handler step; a failure answers the handler's failure policy."""
        try:
            action = call()
        except p.ProtocolError:
            raise
        except Exception:
            log.exception("milter event failed")
            action = self.handler.failed()
        self._reply(cmd, action)

    @property
    def closed(self) -> bool:
        return self._closed

    def drop(self) -> None:
        """Close at once (RST): no more events, nothing more written."""
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- events --------------------------------------------------------------------------

    def _negotiate(self, data: bytes) -> None:
        version, actions, offered = p.parse_negotiate(data)
        if version < 2:
            raise p.ProtocolError(f"milter protocol version {version} (at least 2)")
        options = self.server.options
        self._protocol = offered & options.protocol
        self._can_act = actions & options.required == options.required
        mine = actions & options.actions
        macros = options.macros if mine & p.F_SETSYMLIST else {}
        self.handler.close()
        # header values with their exact leading space, as the MTA sends them (LEADSPC)?
        self.handler = self.server.new_handler(bool(self._protocol & p.P_HDR_LEADSPC))
        self._send(p.negotiate_reply(mine, self._protocol, macros))

    def _macro(self, data: bytes) -> None:
        if not data:
            raise p.ProtocolError("macro packet without a command")
        self._macros[data[0]] = data  # each packet replaces its stage's macros, as libmilter

    def _lookup(self, stages: tuple[int, ...]) -> Macros:
        def lookup(name: str) -> str | None:
            for stage in stages:
                raw = self._macros.get(stage)
                value = None if raw is None else p.parse_macros(raw)[1].get(name)
                if value:
                    return value
            return None

        return lookup

    def _connect(self, data: bytes) -> None:
        ip = p.parse_connect(data)
        self._macros = {k: v for k, v in self._macros.items() if k == p.C_CONNECT}
        self._held = None
        if self.server.draining or not self._can_act:
            # stopping (new connections pass untouched), or an MTA that does not let the
            # handler act: nothing to do on this connection
            self._send(p.REPLY_ACCEPT)
            return
        self._answer(p.C_CONNECT, lambda: self.handler.connect(ip))

    # Events the handler does not need (an MTA that honours the options does not even send
    # them): answered with continue, unless the agreed options took their reply away.
    def _helo(self, data: bytes) -> None:
        self._reply(p.C_HELO, Action.CONTINUE)

    def _rcpt(self, data: bytes) -> None:
        self._reply(p.C_RCPT, Action.CONTINUE)

    def _data(self, data: bytes) -> None:
        self._reply(p.C_DATA, Action.CONTINUE)

    def _unknown(self, data: bytes) -> None:
        self._reply(p.C_UNKNOWN, Action.CONTINUE)

    def _mail(self, data: bytes) -> None:
        self._held = None
        macros = self._lookup(_MAIL_STAGES)
        self._answer(p.C_MAIL, lambda: self.handler.mail(p.first_arg(data), macros))

    def _header(self, data: bytes) -> None:
        name, value = p.parse_header(data)
        self._answer(p.C_HEADER, lambda: self.handler.header(name, value))

    def _eoh(self, data: bytes) -> None:
        macros = self._lookup(_EOH_STAGES)
        self._answer(p.C_EOH, lambda: self.handler.end_of_headers(macros))

    def _body(self, data: bytes) -> None:
        self._answer(p.C_BODY, lambda: self.handler.body(data))

    def _eom(self, data: bytes) -> None:
        if data:  # Sendmail may send the last body chunk with the end of message
            self._body(data)
        out = []
        try:
            action, fields = self.handler.end_of_message(self._lookup(_EOM_STAGES))
        except p.ProtocolError:
            raise
        except Exception:
            log.exception("end-of-message event failed")
            action, fields = self.handler.failed(), []
        if self._held is not None:  # the message ended earlier, where no reply went
            action, fields, self._held = self._held, [], None
        # insert at index 0 in reverse, so that the first field ends up topmost
        for raw in reversed(fields):
            name, _, value = raw.partition(b":")
            # the value keeps its leading space (SMFIP_HDR_LEADSPC); folds go as LF
            out.append(p.insert_header(0, name, value[:-2].replace(b"\r\n", b"\n")))
        out.append(_REPLY[action])
        self._send(b"".join(out))  # one write
        self._end_message()

    def _abort(self, data: bytes) -> None:
        try:
            self.handler.abort()
        finally:
            self._held = None
            self._end_message()

    def _end_message(self) -> None:
        for stage in _MESSAGE_STAGES:
            self._macros.pop(stage, None)

    def _quit(self, data: bytes) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()  # after what is written

    def _quit_nc(self, data: bytes) -> None:
        """QUIT, but a new connection follows on this socket: start over, keeping the
        negotiated options."""
        self.handler.close()
        if self.handler is not _NOT_NEGOTIATED:  # no handler before option negotiation
            self.handler = self.server.new_handler(bool(self._protocol & p.P_HDR_LEADSPC))
        self._macros = {}
        self._held = None


# One table for all connections, of plain functions: a per-connection dict of bound methods
# would tie each connection into a reference cycle, freed only by the cyclic GC (the soak
# test saw RSS creep ~80 bytes a message until a full collection).
_HANDLERS: dict[int, Callable[[MilterConnection, bytes], None]] = {
    p.C_OPTNEG: MilterConnection._negotiate,
    p.C_MACRO: MilterConnection._macro,
    p.C_CONNECT: MilterConnection._connect,
    p.C_HELO: MilterConnection._helo,
    p.C_MAIL: MilterConnection._mail,
    p.C_RCPT: MilterConnection._rcpt,
    p.C_DATA: MilterConnection._data,
    p.C_HEADER: MilterConnection._header,
    p.C_EOH: MilterConnection._eoh,
    p.C_BODY: MilterConnection._body,
    p.C_EOM: MilterConnection._eom,
    p.C_ABORT: MilterConnection._abort,
    p.C_UNKNOWN: MilterConnection._unknown,
    p.C_QUIT: MilterConnection._quit,
    p.C_QUIT_NC: MilterConnection._quit_nc,
}
