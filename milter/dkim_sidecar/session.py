"""One milter connection and the messages on it: every signing decision is made here.

Session is the milter server's per-connection handler (milter/api.Handler): the server passes
each event on and carries the answer back; Session knows nothing of the protocol. Decisions
are taken as early as possible (docs/design.md): the client address at connect,
authentication at MAIL, keys and existing signatures at the end of the header; only then is
the body hashed.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import DomainFrom, LongLines, OnError
from .dkim import canon
from .dkim.header import HeaderField, address_domain, from_domain, make_field, signed_domains
from .dkim.keys import SigningKey
from .dkim.signer import MessageSigner
from .milter.api import Action, Macros
from .runtime import Runtime


class Reason(enum.StrEnum):
    """Why a message ended as it did: the fixed label set of the messages metric."""

    SIGNED = "signed"
    NOT_RELAY = "not_relay"
    AUTHENTICATED = "authenticated"
    NO_KEY = "no_key"
    ALREADY_SIGNED = "already_signed"
    NO_FROM = "no_from"
    MULTIPLE_FROM = "multiple_from"
    BAD_FROM = "bad_from"
    NO_SENDER = "no_sender"
    HEADER_LIMIT = "header_limit"
    LONG_LINES = "long_lines"
    INEXACT_HEADERS = "inexact_headers"
    ABORTED = "aborted"
    ERROR = "error"

    @property
    def outcome(self) -> str:
        if self is Reason.SIGNED:
            return "signed"
        if self is Reason.ERROR:
            return "error"
        if self is Reason.ABORTED:
            return "aborted"
        return "skipped"


@dataclass
class MessageReport:
    """Everything the one log line and the metrics say about a message."""

    reason: Reason
    client_ip: str | None
    queue_id: str | None = None
    domain: str | None = None
    keys: tuple[SigningKey, ...] = ()
    size: int = 0
    duration: float = 0.0  # wall seconds from MAIL to the decision (includes waiting on the MTA)
    sign_seconds: float = 0.0
    action: Action = Action.ACCEPT
    detail: str | None = None  # for errors: the exception text, never key material


Reporter = Callable[[MessageReport], None]

_LONG_LINE = 998  # RFC 5322 §2.1.1: at most 998 octets per line, CRLF excluded


class LongLineScanner:
    """Tells whether a CRLF body has a line over 998 octets, chunk by chunk (pure Python).

    Postfix's SMTP client folds such lines after every milter ran (smtp_line_length_limit),
    which breaks every signature over them. rfind() from the window's end jumps about a whole
    line-limit per step, so a normal body costs about one step per 1000 octets.
    """

    __slots__ = ("_cur", "found")

    def __init__(self) -> None:
        self._cur = 0  # octets of the current line seen so far
        self.found = False

    def update(self, chunk: bytes) -> None:
        if self.found:
            return
        limit = _LONG_LINE + 2  # the LF may stand at most this far from the line start
        n = len(chunk)
        pos, cur = 0, self._cur
        while True:
            end = pos + limit - cur
            if end > n:
                last = chunk.rfind(b"\n", pos)
                cur = cur + n - pos if last < 0 else n - last - 1
                if cur > limit - 1:
                    self.found = True
                self._cur = cur
                return
            last = chunk.rfind(b"\n", pos, end)
            if last < 0:
                self.found = True
                return
            pos, cur = last + 1, 0


_BARE_LF = re.compile(rb"(?<!\r)\n")


class CrlfFixer:
    """The MTA's line ends turned into CRLF at the edge (the DKIM core takes CRLF only): bare
    LF → CRLF (pure Python). A CR ending one chunk and the LF starting the next are one line
    end."""

    __slots__ = ("_prev_cr",)

    def __init__(self) -> None:
        self._prev_cr = False

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        prev_cr, self._prev_cr = self._prev_cr, chunk.endswith(b"\r")
        lf = chunk.count(b"\n")
        if not lf:
            return chunk
        crlf = chunk.count(b"\r\n") + (1 if prev_cr and chunk[:1] == b"\n" else 0)
        if lf == crlf:  # the common case: nothing to change, no copy
            return chunk
        return _fix_bare_lf(chunk, prev_cr)


def _fix_bare_lf(chunk: bytes, prev_cr: bool) -> bytes:
    if prev_cr and chunk[:1] == b"\n":
        return b"\n" + _BARE_LF.sub(b"\r\n", chunk[1:])
    return _BARE_LF.sub(b"\r\n", chunk)


class BodyEdge:
    """The body as the MTA sends it, made ready for the core: bare LF → CRLF, and lines over
    998 octets noted (`long_line`). Postfix sends CRLF, so the fix is almost never needed, but
    finding that out must be cheap: with the C helper it is one pass over each chunk, where
    the pure-Python fallback (CrlfFixer and LongLineScanner) takes several."""

    __slots__ = ("_c", "_fallback", "_line", "_prev", "long_line")

    def __init__(self) -> None:
        self._prev = 0  # the last octet of the previous chunk
        self._line = 0  # octets of the line still open
        self.long_line = False
        helper = canon.scan_helper
        # the C helper's edge() and its two flags, looked up once; else the pure-Python pair
        self._c: tuple[Callable[[bytes, int, int, int], tuple[int, int]], int, int] | None = (
            None if helper is None else (helper.edge, helper.BARE_LF, helper.LONG_LINE)
        )
        self._fallback = None if helper is not None else (CrlfFixer(), LongLineScanner())

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        if self._c is None:
            assert self._fallback is not None
            fixer, scanner = self._fallback
            chunk = fixer(chunk)
            scanner.update(chunk)
            self.long_line = scanner.found
            return chunk
        edge, bare_lf, long_line = self._c
        prev, line = self._prev, self._line
        flags, self._line = edge(chunk, prev, line, _LONG_LINE)
        if flags & bare_lf:
            chunk = _fix_bare_lf(chunk, prev == 13)
            # again over the fixed chunk: each CR added lengthens its line by one octet
            flags, self._line = edge(chunk, prev, line, _LONG_LINE)
        self._prev = chunk[-1]
        if flags & long_line:
            self.long_line = True
        return chunk


def header_value_to_crlf(value: bytes) -> bytes:
    """A header value as Postfix sends it (folds as LF) with CRLF folds."""
    if b"\n" not in value:
        return value
    return value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass
class _Message:
    runtime: Runtime
    started: float
    sender: bytes = b""
    fields: list[HeaderField] = field(default_factory=list)
    header_bytes: int = 0
    over_limit: bool = False
    size: int = 0
    signer: MessageSigner | None = None
    domain: str | None = None
    keys: tuple[SigningKey, ...] = ()
    edge: BodyEdge = field(default_factory=BodyEdge)
    skip_long_lines: bool = False


class Session:
    """The state of one milter connection: the client, and the message in progress."""

    def __init__(
        self,
        current: Callable[[], Runtime],
        report: Reporter,
        *,
        exact_headers: bool = True,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._current = current
        self._report = report
        self._clock = clock
        self._timer = timer
        self.exact_headers = exact_headers
        self.client_ip: str | None = None
        self._msg: _Message | None = None
        self.queue_id: str | None = None

    @property
    def in_progress(self) -> bool:
        """A message between MAIL and its end (what a clean stop waits for)."""
        return self._msg is not None

    # --- protocol events -----------------------------------------------------------------

    def connect(self, client_ip: str | None) -> Action:
        """A (new) client: after XCLIENT Postfix sends another connect on the same session,
        so the latest connect is the one that counts (XCLIENT: tests/test_postfix.py)."""
        self._msg = None
        self.client_ip = client_ip
        runtime = self._current()
        if client_ip is None or not runtime.is_relay(client_ip):
            self._report(MessageReport(Reason.NOT_RELAY, client_ip))
            return Action.ACCEPT
        return Action.CONTINUE

    def mail(self, sender: bytes, macros: Macros) -> Action:
        """MAIL FROM: a message starts; it keeps this runtime snapshot to its end."""
        auth_authen = macros("{auth_authen}")
        runtime = self._current()
        self.queue_id = None
        self._msg = _Message(runtime, self._timer(), sender=sender)
        # the relay check again, against this message's snapshot: a reload may have shrunk
        # the relay networks since connect
        if self.client_ip is None or not runtime.is_relay(self.client_ip):
            return self._skip(Reason.NOT_RELAY)
        if auth_authen and not runtime.config.sign_authenticated:
            return self._skip(Reason.AUTHENTICATED)
        return Action.CONTINUE

    def header(self, name: bytes, value: bytes) -> Action:
        """One header field: CONTINUE, or the failure policy's answer if it cannot be kept."""
        msg = self._msg
        if msg is None or msg.over_limit:
            return Action.CONTINUE
        try:
            f = make_field(name, header_value_to_crlf(value))
        except Exception as exc:  # noqa: BLE001
            return self._fail(exc)
        msg.header_bytes += len(f.raw)
        limits = msg.runtime.config.limits
        if len(msg.fields) >= limits.max_headers or msg.header_bytes > limits.max_header_bytes:
            msg.over_limit = True
            msg.fields.clear()  # the cap is there to bound memory: let it go now
            return Action.CONTINUE
        msg.fields.append(f)
        return Action.CONTINUE

    def end_of_headers(self, macros: Macros) -> Action:
        msg = self._msg
        if msg is None:
            return Action.ACCEPT
        self.queue_id = macros("i") or self.queue_id
        try:
            return self._decide(msg)
        except Exception as exc:  # noqa: BLE001 - one policy for every internal error
            return self._fail(exc)

    def body(self, chunk: bytes) -> Action:
        msg = self._msg
        if msg is None or msg.signer is None:
            return Action.ACCEPT
        try:
            msg.size += len(chunk)
            chunk = msg.edge(chunk)
            if msg.skip_long_lines and msg.edge.long_line:
                return self._skip(Reason.LONG_LINES)
            msg.signer.update(chunk)
        except Exception as exc:  # noqa: BLE001
            return self._fail(exc)
        return Action.CONTINUE

    def end_of_message(self, macros: Macros) -> tuple[Action, list[bytes]]:
        """ACCEPT, with the DKIM-Signature fields to insert at the top (first = topmost)."""
        msg = self._msg
        if msg is None or msg.signer is None:
            return Action.ACCEPT, []
        self.queue_id = macros("i") or self.queue_id
        try:
            t0 = self._timer()
            fields = msg.signer.sign(msg.fields)
            sign_seconds = self._timer() - t0
        except Exception as exc:  # noqa: BLE001
            return self._fail(exc), []
        self._finish(msg, Reason.SIGNED, Action.ACCEPT, sign_seconds=sign_seconds)
        return Action.ACCEPT, fields

    def abort(self) -> None:
        """The MTA gave up on this message (RSET, client gone): it is not ours to report
        again if it already ended."""
        msg = self._msg
        if msg is not None:
            self._finish(msg, Reason.ABORTED, Action.CONTINUE)

    def close(self) -> None:
        self.abort()

    def failed(self) -> Action:
        """An event raised past the session's own handling (a bug; the server logged it): the
        failure policy, and the message in progress, if any, ends as an error."""
        msg = self._msg
        action = _policy(msg.runtime if msg is not None else self._current())
        if msg is not None:
            self._finish(msg, Reason.ERROR, action, detail="internal error (see the log)")
        return action

    # --- decisions ---------------------------------------------------------------------------

    def _decide(self, msg: _Message) -> Action:
        config = msg.runtime.config
        if not self.exact_headers:
            return self._skip(Reason.INEXACT_HEADERS)
        if msg.over_limit:
            return self._skip(Reason.HEADER_LIMIT)
        if config.domain_from is DomainFrom.ENVELOPE:
            author = address_domain(msg.sender.decode("utf-8", "surrogateescape"))
            if author is None:
                return self._skip(Reason.NO_SENDER)
        else:
            found = from_domain(msg.fields)
            if found.domain is None:
                return self._skip(Reason(found.reason or Reason.BAD_FROM))
            author = found.domain
        domain, keys = msg.runtime.keys.lookup(author, config.parent_domain_fallback)
        msg.domain = domain or author
        if not keys:
            return self._skip(Reason.NO_KEY)
        if domain in signed_domains(msg.fields):
            return self._skip(Reason.ALREADY_SIGNED)  # e.g. rspamd signed it already
        msg.keys = keys
        msg.signer = MessageSigner(keys, msg.runtime.policy, int(self._clock()))
        msg.skip_long_lines = config.long_lines is LongLines.SKIP
        return Action.CONTINUE

    def _skip(self, reason: Reason) -> Action:
        msg = self._msg
        if msg is not None:
            self._finish(msg, reason, Action.ACCEPT)
        return Action.ACCEPT

    def _fail(self, exc: Exception) -> Action:
        """The one failure policy: on_error decides between accept (unsigned) and tempfail."""
        msg = self._msg
        if msg is None:
            return Action.ACCEPT
        action = _policy(msg.runtime)
        self._finish(msg, Reason.ERROR, action, detail=f"{type(exc).__name__}: {exc}")
        return action

    def _finish(
        self,
        msg: _Message,
        reason: Reason,
        action: Action,
        *,
        sign_seconds: float = 0.0,
        detail: str | None = None,
    ) -> None:
        self._msg = None
        self._report(
            MessageReport(
                reason=reason,
                client_ip=self.client_ip,
                queue_id=self.queue_id,
                domain=msg.domain,
                keys=msg.keys if reason is Reason.SIGNED else (),
                size=msg.size,
                duration=self._timer() - msg.started,
                sign_seconds=sign_seconds,
                action=action,
                detail=detail,
            )
        )


def _policy(runtime: Runtime) -> Action:
    """The one failure policy (on_error): let the message go unsigned, or tempfail it."""
    return Action.TEMPFAIL if runtime.config.on_error is OnError.TEMPFAIL else Action.ACCEPT
