"""The milter protocol served from one asyncio event loop: the listening socket, the
connections on it (connection.py), peer admission through an optional gate, idle sweeps and a
clean stop. It knows nothing of DKIM, config or metrics; docs/design.md says why it is not
libmilter.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable

from .address import Listen, ListenKind
from .api import Handler, Options, PeerGate
from .connection import MilterConnection

__all__ = ["MilterServer"]

log = logging.getLogger("dkim_sidecar.milter")  # the library's own, under the app's

_MAX_HELD = 64  # peers awaiting the gate's verdict at once; more are refused
IDLE_TIMEOUT = 600.0  # seconds a connection may stay silent (libmilter's was 600 here too)
_SWEEP = 30.0


def _remove_socket(path: str) -> None:
    """Remove a unix socket file, and only that: a typo in `listen` (unix:/etc/postfix/main.cf)
    must not delete a file; binding over it then fails with "cannot listen"."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def _any_address_socket(port: int | None) -> socket.socket:
    """`inet6:[::]:PORT`: one socket for both address families (IPV6_V6ONLY off; an IPv4 peer
    shows as ::ffff:a.b.c.d). asyncio would make it IPv6-only.
    Where the kernel has no IPv6 (a container on a network without it), IPv4 only, said once:
    an MTA that finds no listener would pass its mail unsigned."""
    assert port is not None
    try:
        return _bound(socket.AF_INET6, "::", port)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        log.warning(
            "no IPv6 here; listening on IPv4 only", extra={"fields": {"error": exc.strerror}}
        )
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
    """The listening socket and the connections on it.

    `new_handler(exact_headers)` makes each connection's handler at option negotiation (and
    again after QUIT_NC); `exact_headers` says whether header values come with their exact
    leading space. `gate`, if given, decides which peers of an inet listener may talk.
    """

    def __init__(
        self,
        new_handler: Callable[[bool], Handler],
        options: Options,
        gate: PeerGate | None = None,
    ) -> None:
        self.new_handler = new_handler
        self.options = options
        self.gate = gate
        self.connections: set[MilterConnection] = set()
        self.draining = False  # set at a stop: new connections are let go at connect
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._listen: Listen | None = None
        # unknown peers held (nothing they send acted on) while the gate retries
        self._resolving: asyncio.Future[None] | None = None
        self._held: list[MilterConnection] = []
        # the gate's generation the open connections were last checked against
        self._gate_seen = gate.generation if gate is not None else 0

    def in_progress(self) -> int:
        return sum(1 for c in self.connections if c.handler.in_progress)

    # --- who may connect --------------------------------------------------------------------

    @property
    def checks_peers(self) -> bool:
        """Is each connection's peer address checked (an inet listener; a unix socket's file
        mode decides who may connect)?"""
        return self._listen is not None and self._listen.kind is not ListenKind.UNIX

    def admit_later(self, conn: MilterConnection, gate: PeerGate) -> None:
        """A peer the gate does not (yet) allow: if a retry is due, hold the connection until
        it is done, then decide; else refuse it now. Nothing it sends is acted on, and
        nothing is written to it, before the decision."""
        if len(self._held) >= _MAX_HELD or (self._resolving is None and not gate.may_retry()):
            self.refuse(conn)
            return
        assert conn.transport is not None
        conn.transport.pause_reading()
        self._held.append(conn)
        if self._resolving is None:
            loop = asyncio.get_running_loop()
            self._resolving = loop.run_in_executor(None, gate.retry)
            self._resolving.add_done_callback(self._resolved)

    def _resolved(self, future: asyncio.Future[None]) -> None:
        self._resolving = None
        if not future.cancelled() and future.exception() is not None:
            log.error("the peer gate's retry failed", exc_info=future.exception())
        held, self._held = self._held, []
        gate = self.gate
        for conn in held:
            try:
                if conn.closed or conn.transport is None:
                    continue
                if gate is not None and gate.allows(conn.peer_ip or "?"):
                    conn.admit()
                else:
                    self.refuse(conn)
            except Exception:
                log.exception("deciding on a held milter connection failed")
                conn.drop()

    def recheck_peers(self) -> None:
        """Close the open connections whose peer the gate no longer allows (after a reload
        that narrowed it, or a name that moved): a connection admitted under the old rule
        must not keep talking."""
        gate = self.gate
        if gate is None or not self.checks_peers:
            return
        self._gate_seen = gate.generation
        for conn in list(self.connections):
            if not gate.allows(conn.peer_ip or "?"):
                self.refuse(conn)

    def refuse(self, conn: MilterConnection) -> None:
        """Close a connection from a peer the gate does not allow, after telling the gate."""
        if self.gate is not None:
            self.gate.refused(conn.peer_ip or "?")
        conn.drop()

    # --- the socket -------------------------------------------------------------------------

    async def start(self, listen: Listen) -> None:
        """Listen on `listen`; OSError when the address cannot be taken."""
        loop = asyncio.get_running_loop()

        def factory() -> MilterConnection:
            return MilterConnection(self)

        self._listen = listen
        if listen.kind is ListenKind.UNIX:
            assert listen.path is not None
            _remove_socket(listen.path)  # left by a run that was killed
            self._server = await loop.create_unix_server(factory, listen.path, backlog=511)
            # owner and group only: whoever can connect can ask the handler for anything
            # (the MTA's user needs the group, or the same user)
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
        those whose peer the gate no longer allows since its answers changed."""
        while True:
            await asyncio.sleep(_SWEEP)
            if self.gate is not None and self.gate.generation != self._gate_seen:
                self.recheck_peers()
            for conn in list(self.connections):
                conn.idle += 1
                if conn.idle * _SWEEP >= IDLE_TIMEOUT:
                    log.info(
                        "closing idle milter connection", extra={"fields": {"peer": conn.peer}}
                    )
                    conn.drop()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in [*self.connections, *self._held]:
            conn.drop()
        self._held.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost
        listen = self._listen
        if listen is not None and listen.kind is ListenKind.UNIX and listen.path:
            _remove_socket(listen.path)
