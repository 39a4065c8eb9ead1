"""A byte-exact SMTP sink on loopback, for tests that need to see what Postfix delivered.

Why not Postfix's own ``smtp-sink -d``: it reads the message line by line through
Postfix's line reader (which splits lines longer than ``line_length_limit``), writes the
dump with bare LF line ends and prepends its own ``X-Client-*``/``X-Mail-Args`` headers.
None of that is acceptable when the test is "does this DKIM signature still verify", so
this module implements the (small) server side of SMTP itself.

What is stored: ``SinkMessage.data`` holds the DATA content exactly as it arrived on the
wire, line ends included (Postfix sends CRLF), with only the SMTP transparency dot removed
(RFC 5321 4.5.2) and without the terminating ``.<CRLF>`` line. Nothing is parsed or
re-serialized.

``messages`` is in delivery order, which is not submission order when several messages
are queued at once (Postfix delivers in parallel): match by Message-ID or queue id.

The server advertises 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES and SIZE (default 200 MB) but
not PIPELINING, CHUNKING or STARTTLS, so Postfix's SMTP client talks to it in plain lock
step and always uses DATA. The greeting host name is ``sink.harness.test``: it must differ
from Postfix's ``myhostname`` or Postfix defers with "mail for ... loops back to myself".
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field

__all__ = ["SinkMessage", "SmtpSink"]

CRLF = b"\r\n"


@dataclass
class SinkMessage:
    """One message as received by the sink."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)
    helo: str = ""
    peer: tuple[str, int] = ("", 0)
    received_at: float = 0.0

    @property
    def body(self) -> bytes:
        """The bytes after the first empty line (CRLF CRLF), or b"" if there is none."""
        _head, sep, body = self.data.partition(b"\r\n\r\n")
        return body if sep else b""

    @property
    def header_block(self) -> bytes:
        """The header block including its final CRLF (without the empty separator line)."""
        head, sep, _body = self.data.partition(b"\r\n\r\n")
        return head + CRLF if sep else self.data


def _strip_path(arg: str) -> str:
    """'<a@b> SIZE=1' -> 'a@b' (the address between the angle brackets, if any)."""
    arg = arg.strip()
    if arg.startswith("<"):
        end = arg.find(">")
        if end != -1:
            return arg[1:end]
    return arg.split(" ", 1)[0]


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], sink: SmtpSink) -> None:
        self.sink = sink
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        super().__init__(addr, _Handler)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    rbufsize = 1 << 16
    timeout = 120  # per-read socket timeout: bounds a hung client

    def _reply(self, text: str) -> None:
        self.wfile.write(text.encode("ascii") + CRLF)
        self.wfile.flush()

    def handle(self) -> None:
        sink = self.server.sink
        sink._register(self.connection)
        try:
            self._session(sink)
        except (OSError, ValueError):
            pass  # client went away, or the sink is shutting down
        finally:
            sink._unregister(self.connection)

    def _session(self, sink: SmtpSink) -> None:
        self._reply(f"220 {sink.hostname} ESMTP harness sink")
        helo = ""
        mail_from: str | None = None
        mail_options: list[str] = []
        rcpts: list[str] = []
        while True:
            raw = self.rfile.readline(65536)
            if not raw:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                helo = arg
                mail_from, mail_options, rcpts = None, [], []
                self.wfile.write(
                    (
                        f"250-{sink.hostname}\r\n"
                        "250-8BITMIME\r\n"
                        "250-SMTPUTF8\r\n"
                        "250-ENHANCEDSTATUSCODES\r\n"
                        f"250 SIZE {sink.max_size}\r\n"
                    ).encode("ascii")
                )
                self.wfile.flush()
            elif verb == "HELO":
                helo = arg
                mail_from, mail_options, rcpts = None, [], []
                self._reply(f"250 {sink.hostname}")
            elif verb == "MAIL" and arg[:5].upper() == "FROM:":
                rest = arg[5:].strip()
                mail_from = _strip_path(rest)
                after = rest[rest.find(">") + 1 :] if rest.startswith("<") else ""
                mail_options = after.split()
                rcpts = []
                self._reply("250 2.1.0 Ok")
            elif verb == "RCPT" and arg[:3].upper() == "TO:":
                if mail_from is None:
                    self._reply("503 5.5.1 Error: need MAIL command")
                    continue
                rcpt = _strip_path(arg[3:])
                code = sink.rcpt_reply_for(rcpt)
                if code is not None:
                    self._reply(code)
                    continue
                rcpts.append(rcpt)
                self._reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    self._reply("503 5.5.1 Error: need RCPT command")
                    continue
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                if data is None:
                    return
                msg = SinkMessage(
                    mail_from=mail_from,
                    rcpt_tos=rcpts,
                    data=data,
                    mail_options=mail_options,
                    helo=helo,
                    peer=self.client_address[:2],
                    received_at=time.monotonic(),
                )
                reply = sink._store(msg)
                self._reply(reply)
                mail_from, mail_options, rcpts = None, [], []
            elif verb == "RSET":
                mail_from, mail_options, rcpts = None, [], []
                self._reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self._reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self._reply("221 2.0.0 Bye")
                return
            else:
                self._reply("502 5.5.2 Error: command not recognized")

    def _read_data(self) -> bytes | None:
        """Read DATA content up to the lone dot line; undo dot stuffing, keep all else."""
        chunks: list[bytes] = []
        readline = self.rfile.readline
        while True:
            line = readline()  # unbounded on purpose: lines are stored as they come
            if not line:
                return None
            if line == b".\r\n" or line == b".\n":
                return b"".join(chunks)
            if line[:1] == b".":
                line = line[1:]
            chunks.append(line)


class SmtpSink:
    """Threaded SMTP server on loopback that stores every message byte-exact.

    ``rcpt_replies`` maps a recipient address to a full reply line (e.g.
    ``"450 4.2.0 try later"``) to refuse that recipient; ``data_reply`` replaces the
    ``250`` sent after DATA (the message is still recorded in ``attempts``, and in
    ``messages`` only if the reply starts with 2).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        max_size: int = 200 * 1024 * 1024,
        hostname: str = "sink.harness.test",
    ) -> None:
        self.host = host
        self.port = port
        self.max_size = max_size
        self.hostname = hostname
        self.messages: list[SinkMessage] = []
        self.attempts: list[SinkMessage] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply = "250 2.0.0 Ok: stored"
        self._cond = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> SmtpSink:
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"smtp-sink-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- results ---------------------------------------------------------------------

    def wait_for(self, n: int, timeout: float = 60.0) -> list[SinkMessage]:
        """Block until at least ``n`` messages were accepted; return a copy of the list.

        Raises ``TimeoutError`` (naming how many did arrive) after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"sink on port {self.port}: {len(self.messages)} of {n} messages "
                        f"after {timeout}s"
                    )
                self._cond.wait(left)
            return list(self.messages)

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()
            self.attempts.clear()

    # -- handler callbacks ------------------------------------------------------------

    def rcpt_reply_for(self, rcpt: str) -> str | None:
        return self.rcpt_replies.get(rcpt)

    def _store(self, msg: SinkMessage) -> str:
        reply = self.data_reply
        with self._cond:
            self.attempts.append(msg)
            if reply.startswith("2"):
                self.messages.append(msg)
            self._cond.notify_all()
        return reply

    def _register(self, conn: socket.socket) -> None:
        with self._cond:
            self._conns.add(conn)

    def _unregister(self, conn: socket.socket) -> None:
        with self._cond:
            self._conns.discard(conn)
