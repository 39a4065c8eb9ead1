"""The milter protocol served from one asyncio event loop (uvloop where installed, see
service.py): packets in, Session calls, replies out.

Why not libmilter (through pymilter): it runs a thread per connection and crosses into Python
per event through the GIL, and needed a workaround each for its signal handling, its stop, its
64 KB command limit and pymilter's negotiation. Issue 7 measured the difference side by side.
Here a connection is a Protocol object, each packet is one dict lookup and one Session call,
and every reply is a single write on a TCP_NODELAY socket: nothing waits on a delayed ACK.

Protocol choices (negotiated per connection, from what the MTA offers):
- header values with their exact leading space (SMFIP_HDR_LEADSPC): DKIM signs bytes, so
  nothing is rebuilt as `name + ": " + value`; an MTA that cannot give them exactly gets no
  signature (Session: inexact_headers);
- no HELO, RCPT or unknown-command events;
- replies only where a decision is due: at connect (clients outside the relay networks are let
  go there), at DATA and at end of message. MAIL, header, end-of-header and body packets get
  none (SMFIP_NR_*): the MTA streams them without waiting on us. A decision taken there (an
  authenticated sender at MAIL, no key at the end of the header) is the answer to the next
  command that has a reply. Fewer round trips cost both sides less CPU (issue 7, measured
  through Postfix); the price is that a message we let go at the end of its header still has
  its body sent to us;
- the DATA step is answered, not skipped: Postfix then sends the header without waiting on a
  delayed ACK (issue 7: a skipped DATA step stalls each message ~40 ms);
- the macros we read are asked for (SMFIR_SETSYMLIST), so Mailcow's `milter_*_macros` lines do
  not matter: `{auth_authen}` at MAIL, `i` (queue ID) at end of header and end of message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from .config import OnError
from .logs import event
from .metrics import Metrics
from .milter import codec as p
from .milter.address import Listen, ListenKind
from .runtime import Controller, Runtime
from .session import Action, Reporter, Session

log = logging.getLogger("dkim_sidecar")

WANTED_PROTOCOL = (
    p.P_NOHELO
    | p.P_NORCPT
    | p.P_NOUNKNOWN
    | p.P_NR_MAIL
    | p.P_NR_HDR
    | p.P_NR_EOH
    | p.P_NR_BODY
    | p.P_HDR_LEADSPC
)
WANTED_ACTIONS = p.F_ADDHDRS | p.F_SETSYMLIST
MACROS = {p.M_ENVFROM: "{auth_authen}", p.M_EOH: "i", p.M_EOM: "i"}
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

_FIRST_SIZE = 16 * 1024  # a connection's read buffer at first: a small message fits
_READ_SIZE = 256 * 1024  # it grows up to this (more only for a larger packet)
_MIN_ROOM = 4096  # room offered to each read, at least
_HELD_BYTES = 4096  # what a peer awaiting its mta_peers verdict may send (an MTA: one packet)
_MAX_HELD = 64  # peers awaiting a verdict at once; more are refused
_MAX_REFUSALS_LOGGED = 256  # distinct peers whose refusal is logged per minute

REFUSAL_LOG_SECONDS = 60.0  # a refused peer is logged at most this often
IDLE_TIMEOUT = 600.0  # seconds a connection may stay silent (libmilter's was 600 here too)
_SWEEP = 30.0


class MilterConnection(asyncio.BufferedProtocol):
    """One connection from the MTA: framing, negotiation, macros; the decisions are Session's."""

    def __init__(self, server: MilterServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(_FIRST_SIZE)
        self._start = 0  # the unparsed octets are _buf[_start:_end]
        self._end = 0
        self._protocol = 0  # the SMFIP_* flags agreed, 0 until negotiated
        self._can_add = False  # the MTA lets us add header fields: never before negotiation
        self.session = self._new_session()
        # each stage's last macro packet, as it came: Postfix sends one before nearly every
        # command (one per header field), and three lookups a message read a few of them
        self._macros: dict[int, bytes] = {}
        # a decision taken where no reply goes (MAIL, header, body), answered at the next reply
        self._held: Action | None = None
        self._closed = False
        # False while the peer waits for its mta_peers verdict: what it sends meanwhile stays
        # in the buffer unparsed (uvloop reads a new socket even when reading is paused)
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
        # the peer of the connection itself, never an address a packet claims (peers.py);
        # a unix socket's peers are governed by its file mode
        if self.server.checks_peers:
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            if not self.server.controller.peers.allows(self.peer_ip):
                self._admitted = False  # "?" (no peer address) is never allowed: fail closed
                self.server.admit_later(self)
                return
        self.server.opened(self)

    def admit(self) -> None:
        """The held peer may talk after all: act on what it sent while it waited."""
        self._admitted = True
        self.server.opened(self)
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
            self.session.close()
        except Exception:
            log.exception("closing the session failed")
        self.server.closed(self)
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
            want = max(want, min(size, self.server.max_packet) + 4 - (end - start))
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
        limit = self.server.max_packet
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
            event(logging.WARNING, "milter protocol error; closing", peer=self.peer, error=str(exc))
            self._drop()
            return
        except Exception:
            # a bug of ours: say so, and let the MTA apply its default action
            log.exception("milter connection failed")
            self._drop()
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

    def _policy(self) -> Action:
        on_error = self.server.controller.current.config.on_error
        return Action.TEMPFAIL if on_error is OnError.TEMPFAIL else Action.ACCEPT

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
        """Run a Session step; a failure of ours answers the failure policy."""
        try:
            action = call()
        except Exception:
            log.exception("milter event failed")
            action = self._policy()
        self._reply(cmd, action)

    def _drop(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- events --------------------------------------------------------------------------

    def _negotiate(self, data: bytes) -> None:
        version, actions, offered = p.parse_negotiate(data)
        if version < 2:
            raise p.ProtocolError(f"milter protocol version {version} (at least 2)")
        self._protocol = offered & WANTED_PROTOCOL
        self._can_add = bool(actions & p.F_ADDHDRS)
        mine = actions & WANTED_ACTIONS
        macros = MACROS if mine & p.F_SETSYMLIST else {}
        self.session.exact_headers = self._exact_headers()
        self._send(p.negotiate_reply(mine, self._protocol, macros))

    def _macro(self, data: bytes) -> None:
        if not data:
            raise p.ProtocolError("macro packet without a command")
        self._macros[data[0]] = data  # each packet replaces its stage's macros, as libmilter

    def _lookup(self, name: str, *stages: int) -> str | None:
        for stage in stages:
            raw = self._macros.get(stage)
            value = None if raw is None else p.parse_macros(raw)[1].get(name)
            if value:
                return value
        return None

    def _connect(self, data: bytes) -> None:
        ip = p.parse_connect(data)
        self._macros = {k: v for k, v in self._macros.items() if k == p.C_CONNECT}
        self._held = None
        if self.server.draining or not self._can_add:
            # stopping (new connections pass unsigned), or an MTA that lets us add nothing
            self._send(p.REPLY_ACCEPT)
            return
        self._answer(p.C_CONNECT, lambda: self.session.connect(ip))

    # Events we do not need (the MTA should not even send HELO, RCPT and unknown commands):
    # answered with continue, unless the agreed options took their reply away.
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
        auth = self._lookup("{auth_authen}", p.C_MAIL, p.C_HELO, p.C_CONNECT)
        self._answer(p.C_MAIL, lambda: self.session.mail(p.first_arg(data), auth))

    def _header(self, data: bytes) -> None:
        name, value = p.parse_header(data)
        self._answer(p.C_HEADER, lambda: self.session.header(name, value))

    def _eoh(self, data: bytes) -> None:
        qid = self._lookup("i", p.C_EOH, p.C_DATA, p.C_MAIL)
        self._answer(p.C_EOH, lambda: self.session.end_of_headers(qid))

    def _body(self, data: bytes) -> None:
        self._answer(p.C_BODY, lambda: self.session.body(data))

    def _eom(self, data: bytes) -> None:
        if data:  # Sendmail may send the last body chunk with the end of message
            self._body(data)
        qid = self._lookup("i", p.C_EOM, p.C_EOH, p.C_DATA, p.C_MAIL)
        out = []
        try:
            action, fields = self.session.end_of_message(qid)
        except Exception:
            log.exception("end-of-message event failed")
            action, fields = self._policy(), []
        if self._held is not None:  # the message ended earlier, where no reply went
            action, fields, self._held = self._held, [], None
        # insert at index 0 in reverse, so that the first signature ends up topmost
        for raw in reversed(fields):
            name, _, value = raw.partition(b":")
            # the value keeps its leading space (SMFIP_HDR_LEADSPC); folds go as LF
            out.append(p.insert_header(0, name, value[:-2].replace(b"\r\n", b"\n")))
        out.append(_REPLY[action])
        self._send(b"".join(out))  # one write
        self._end_message()

    def _abort(self, data: bytes) -> None:
        try:
            self.session.abort()
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
        self.session.close()
        self.session = self._new_session()
        self._macros = {}
        self._held = None

    def _new_session(self) -> Session:
        return Session(
            self.server.current, self.server.reporter, exact_headers=self._exact_headers()
        )

    def _exact_headers(self) -> bool:
        """Header values come with their exact leading space (SMFIP_HDR_LEADSPC)."""
        return bool(self._protocol & p.P_HDR_LEADSPC)


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


def _remove_socket(path: str) -> None:
    """Remove a unix socket file, and only that: a typo in `listen` (unix:/etc/postfix/main.cf)
    must not delete a file; binding over it then fails with "cannot listen"."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def _any_address_socket(port: int | None) -> socket.socket:
    """`inet6:[::]:PORT`: one socket for both address families (IPV6_V6ONLY off; an IPv4 peer
    shows as ::ffff:a.b.c.d, which mta_peers matches as IPv4). asyncio would make it IPv6-only.
    Where the kernel has no IPv6 (a container on a network without it), IPv4 only, said once:
    an MTA that finds no listener would pass its mail unsigned."""
    assert port is not None
    try:
        return _bound(socket.AF_INET6, "::", port)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        event(logging.WARNING, "no IPv6 here; listening on IPv4 only", error=exc.strerror)
    return _bound(socket.AF_INET, "0.0.0.0", port)


def _bound(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class MilterServer:
    """The listening socket and the connections on it."""

    def __init__(self, controller: Controller, reporter: Reporter, max_packet: int) -> None:
        self.controller = controller
        self.reporter = reporter
        self.max_packet = max_packet
        self.metrics: Metrics = controller.metrics
        self.connections: set[MilterConnection] = set()
        self.draining = False  # set at SIGTERM: new connections are let go at connect
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._listen: Listen | None = None
        # unknown peers held (nothing they send acted on) while the names are resolved again
        self._resolving: asyncio.Future[None] | None = None
        self._held: list[MilterConnection] = []
        # peer -> when its refusal was logged, oldest first
        self._refusal_logged: OrderedDict[str, float] = OrderedDict()
        # the peer table the open connections were last checked against
        self._peers_seen: tuple[object, int] = (controller.peers, controller.peers.generation)

    def current(self) -> Runtime:
        return self.controller.current

    def opened(self, conn: MilterConnection) -> None:
        self.connections.add(conn)
        self.metrics.connections_open.inc()

    def closed(self, conn: MilterConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.metrics.connections_open.dec()

    # --- who may connect (mta_peers) ------------------------------------------------------

    @property
    def checks_peers(self) -> bool:
        """Is each connection's peer address checked (an inet listener; a unix socket's file
        mode decides who may connect)?"""
        return self._listen is not None and self._listen.kind is not ListenKind.UNIX

    def admit_later(self, conn: MilterConnection) -> None:
        """A peer not (yet) in mta_peers: if resolving the names again is due, hold the
        connection until that is done, then decide; else refuse it now. Nothing it sends is
        acted on, and nothing is written to it, before the decision."""
        peers = self.controller.peers
        if len(self._held) >= _MAX_HELD or (self._resolving is None and not peers.may_retry()):
            self.refuse(conn)
            return
        assert conn.transport is not None
        conn.transport.pause_reading()
        self._held.append(conn)
        if self._resolving is None:
            loop = asyncio.get_running_loop()
            self._resolving = loop.run_in_executor(None, peers.retry)
            self._resolving.add_done_callback(self._resolved)

    def _resolved(self, future: asyncio.Future[None]) -> None:
        self._resolving = None
        if not future.cancelled() and future.exception() is not None:
            log.error("resolving mta_peers failed", exc_info=future.exception())
        held, self._held = self._held, []
        peers = self.controller.peers  # a reload may have replaced it meanwhile
        for conn in held:
            try:
                if conn._closed or conn.transport is None:
                    continue
                if peers.allows(conn.peer_ip or "?"):
                    conn.admit()
                else:
                    self.refuse(conn)
            except Exception:
                log.exception("deciding on a held milter connection failed")
                conn._drop()

    def recheck_peers(self) -> None:
        """Close the open connections whose peer mta_peers no longer allows (after a reload
        that narrowed it, or a name that moved): a connection admitted under the old list
        must not keep asking for signatures."""
        if not self.checks_peers:
            return
        peers = self.controller.peers
        self._peers_seen = (peers, peers.generation)
        for conn in list(self.connections):
            if not peers.allows(conn.peer_ip or "?"):
                self.refuse(conn)

    def refuse(self, conn: MilterConnection) -> None:
        """Close a connection from a peer outside mta_peers: counted each time, logged at most
        once a minute per peer (and, with a flood of peers, once a minute in all)."""
        self.metrics.connections_refused.inc()
        ip = conn.peer_ip or "?"
        now = time.monotonic()
        logged = self._refusal_logged
        while logged and now - next(iter(logged.values())) >= REFUSAL_LOG_SECONDS:
            logged.popitem(last=False)  # oldest first: forget what was logged a minute ago
        if ip not in logged and len(logged) < _MAX_REFUSALS_LOGGED:
            logged[ip] = now
            event(
                logging.WARNING,
                "milter connection refused: the peer is not in mta_peers",
                peer=ip,
                allowed=self.controller.peers.describe(),
            )
        conn._drop()

    def in_progress(self) -> int:
        return sum(1 for c in self.connections if c.session.in_progress)

    async def start(self, listen: Listen) -> None:
        """Listen on a config.Listen; OSError when the address cannot be taken."""
        loop = asyncio.get_running_loop()

        def factory() -> MilterConnection:
            return MilterConnection(self)

        self._listen = listen
        if listen.kind is ListenKind.UNIX:
            assert listen.path is not None
            _remove_socket(listen.path)  # left by a run that was killed
            self._server = await loop.create_unix_server(factory, listen.path, backlog=511)
            # owner and group only: whoever can connect can ask for signatures (Postfix's user
            # needs the group, or the same user)
            os.chmod(listen.path, 0o660)
        elif listen.kind is ListenKind.INET6 and listen.host == "::":
            self._server = await loop.create_server(
                factory, sock=_any_address_socket(listen.port), backlog=511
            )
        else:
            family = socket.AF_INET6 if listen.kind is ListenKind.INET6 else socket.AF_INET
            assert listen.port is not None
            self._server = await loop.create_server(
                factory, listen.host, listen.port, family=family, backlog=511, reuse_address=True
            )
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close connections that stayed silent for IDLE_TIMEOUT (an MTA that vanished), and
        those whose peer mta_peers no longer allows since a resolution changed it."""
        while True:
            await asyncio.sleep(_SWEEP)
            peers = self.controller.peers
            if self._peers_seen != (peers, peers.generation):  # a name moved: check again
                self.recheck_peers()
            for conn in list(self.connections):
                conn.idle += 1
                if conn.idle * _SWEEP >= IDLE_TIMEOUT:
                    event(logging.INFO, "closing idle milter connection", peer=conn.peer)
                    conn._drop()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in [*self.connections, *self._held]:
            conn._drop()
        self._held.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost
        listen = self._listen
        if listen is not None and listen.kind is ListenKind.UNIX and listen.path:
            _remove_socket(listen.path)
