"""One milter connection and the messages on it: every signing decision is made here.

Session is the milter server's per-connection handler (milter/api.Handler): the server passes
each event on and carries the answer back; Session knows nothing of the protocol. Decisions
are taken as early as possible (docs/design.md): the client address at connect,
authentication at MAIL, keys and existing signatures at the end of the header; only then is
the body hashed.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import DomainFrom, LongLines, OnError
from .dkim.header import (
    FromProblem,
    HeaderField,
    address_domain,
    from_domain,
    make_field,
    signed_domains,
)
from .dkim.keys import SigningKey
from .dkim.signer import MessageSigner
from .edge import BodyEdge, header_value_to_crlf
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


_FROM_REASONS = {
    FromProblem.NO_FROM: Reason.NO_FROM,
    FromProblem.MULTIPLE_FROM: Reason.MULTIPLE_FROM,
    FromProblem.BAD_FROM: Reason.BAD_FROM,
}


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


ReportSink = Callable[[MessageReport], None]  # service.Reporter is one


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
        snapshot: Callable[[], Runtime],
        report: ReportSink,
        *,
        exact_headers: bool = True,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._snapshot = snapshot  # the runtime snapshot now (Controller.current)
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
        so the latest connect is the one that counts (XCLIENT: tests/system/test_postfix.py)."""
        self._msg = None
        self.client_ip = client_ip
        runtime = self._snapshot()
        if client_ip is None or not runtime.is_relay(client_ip):
            self._report(MessageReport(Reason.NOT_RELAY, client_ip))
            return Action.ACCEPT
        return Action.CONTINUE

    def mail(self, sender: bytes, macros: Macros) -> Action:
        """MAIL FROM: a message starts; it keeps this runtime snapshot to its end."""
        auth_authen = macros("{auth_authen}")
        runtime = self._snapshot()
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
        action = _policy(msg.runtime if msg is not None else self._snapshot())
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
                return self._skip(_FROM_REASONS[found.reason or FromProblem.BAD_FROM])
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
