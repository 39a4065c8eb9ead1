"""The pymilter adapter and the process around it: callbacks only pass calls on to Session.

Protocol choices (negotiated per connection):
- header values with their exact leading space (SMFIP_HDR_LEADSPC) and as bytes: DKIM signs
  bytes, so nothing is rebuilt as `name + ": " + value`; if the MTA cannot give them exactly
  we do not sign;
- no HELO, RCPT or unknown-command callbacks; header callbacks without replies (SMFIP_NR_HDR);
- the DATA step is answered, not skipped: Postfix then sends the header without waiting on a
  delayed ACK (issue 7: a skipped DATA step stalls each message ~40 ms);
- the macros we need are asked for (setsymlist), so Mailcow's `milter_mail_macros` line does
  not matter: `{auth_authen}` at MAIL, `i` (queue ID) at end of header and end of message.

libmilter takes SIGHUP and SIGTERM for itself in the thread that runs smfi_main (a SIGHUP
would stop it), so the milter runs in a worker thread and the main thread keeps Python's
signal handlers: SIGHUP reloads, SIGTERM and SIGINT stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import Milter

from . import __version__
from .config import Config, ListenKind, OnError
from .logs import event
from .metrics import Metrics, serve_http
from .runtime import Controller
from .session import Action, MessageReport, Reason, Session

log = logging.getLogger("dkim_sidecar")

_ACTIONS = {
    Action.CONTINUE: Milter.CONTINUE,
    Action.ACCEPT: Milter.ACCEPT,
    Action.TEMPFAIL: Milter.TEMPFAIL,
}

F = TypeVar("F", bound=Callable[..., Any])


class Reporter:
    """Turns each MessageReport into its one log line and its metrics."""

    def __init__(self, metrics: Metrics, per_domain: Callable[[], bool]) -> None:
        self.metrics = metrics
        self.per_domain = per_domain

    def __call__(self, r: MessageReport) -> None:
        m = self.metrics
        m.messages.labels(r.reason.outcome, r.reason.value).inc()
        if r.reason is Reason.NOT_RELAY and r.queue_id is None:
            # inbound Internet mail: let go at connect, not worth a line each at info level
            event(logging.DEBUG, "not a relay client", client=r.client_ip)
            return
        algorithms = ",".join(k.algorithm.value for k in r.keys) or None
        if r.reason is Reason.SIGNED:
            for k in r.keys:
                m.signatures.labels(k.algorithm.value).inc()
            m.sign_seconds.observe(r.sign_seconds)
            m.message_bytes.observe(r.size)
        if r.domain and self.per_domain():
            m.domain_messages.labels(r.domain, r.reason.outcome).inc()
        level = logging.WARNING if r.reason is Reason.ERROR else logging.INFO
        event(
            level,
            r.reason.outcome,
            queue_id=r.queue_id,
            client=r.client_ip,
            reason=r.reason.value,
            action=r.action.value,
            domain=r.domain,
            selectors=",".join(k.selector for k in r.keys) or None,
            algorithms=algorithms,
            size=r.size or None,
            ms=round(r.duration * 1000, 2),
            error=r.detail,
        )


def _guarded(func: F) -> F:
    """No exception leaves a callback: the session's failure policy answers instead."""

    def wrapper(self: SidecarMilter, *args: Any) -> Any:
        try:
            return func(self, *args)
        except Exception:
            log.exception("milter callback %s failed", func.__name__)
            if self.controller.current.config.on_error is OnError.TEMPFAIL:
                return Milter.TEMPFAIL
            return Milter.ACCEPT

    wrapper.__name__ = func.__name__
    wrapper.__dict__.update(func.__dict__)  # keep pymilter's decorator attributes
    return wrapper  # type: ignore[return-value]


@Milter.header_leading_space
class SidecarMilter(Milter.Base):  # type: ignore[misc]
    """One instance per milter connection from the MTA."""

    controller: ClassVar[Controller]
    reporter: ClassVar[Reporter]
    live: ClassVar[weakref.WeakSet[SidecarMilter]] = weakref.WeakSet()

    def __init__(self) -> None:
        super().__init__()
        controller = self.controller
        self.session = Session(lambda: controller.current, self.reporter)
        controller.metrics.connections_open.inc()
        self.live.add(self)

    # The macros we read, asked for by stage (milter protocol v6 SMFIR_SETSYMLIST).
    _MACROS: ClassVar[tuple[tuple[int, str], ...]] = (
        (Milter.M_ENVFROM, "{auth_authen}"),
        (Milter.M_EOH, "i"),
        (Milter.M_EOM, "i"),
    )

    def negotiate(self, opts: list[int]) -> int:
        # Our own, not pymilter's: pymilter 1.0.5's @symlist path hands its C module bytes
        # where it wants str, and the whole negotiation then fails silently (no leading
        # spaces, no skipped steps).
        self._actions, offered, _, _ = opts
        if self._actions & Milter.SETSYMLIST:
            for stage, macros in self._MACROS:
                self._ctx.setsymlist(stage, macros)
        opts[1] = self._protocol = offered & ~self.protocol_mask()
        opts[2] = opts[3] = 0
        return Milter.CONTINUE

    @_guarded
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        # the address the MTA reports for the client: never a header, never a macro
        ip = hostaddr[0] if family in (socket.AF_INET, socket.AF_INET6) and hostaddr else None
        self.session.exact_headers = bool(self._protocol & Milter.P_HDR_LEADSPC)
        if self.controller.draining:
            return Milter.ACCEPT  # stopping: new connections pass unsigned
        return _ACTIONS[self.session.connect(ip)]

    @Milter.nocallback
    def hello(self, hostname: str) -> int:
        return Milter.CONTINUE

    @_guarded
    @Milter.decode("bytes")
    def envfrom(self, mailfrom: bytes, *params: bytes) -> int:
        auth = self.getsymval("{auth_authen}")
        return _ACTIONS[self.session.mail(mailfrom, auth or None)]

    @Milter.nocallback
    def envrcpt(self, to: str, *params: str) -> int:
        return Milter.CONTINUE

    def data(self) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, name: str, value: bytes) -> int:
        try:
            self.session.header(name.encode("utf-8", "surrogateescape"), value)
        except Exception:
            log.exception("header callback failed")
        return Milter.CONTINUE

    @_guarded
    def eoh(self) -> int:
        return _ACTIONS[self.session.end_of_headers(self.getsymval("i"))]

    @_guarded
    def body(self, chunk: bytes) -> int:
        return _ACTIONS[self.session.body(chunk)]

    @_guarded
    def eom(self) -> int:
        action, fields = self.session.end_of_message(self.getsymval("i"))
        # insert at index 0 in reverse, so that the first signature ends up topmost
        for raw in reversed(fields):
            name, _, value = raw.partition(b":")
            # with SMFIP_HDR_LEADSPC the value carries its own leading space; folds go as LF
            text = value[:-2].replace(b"\r\n", b"\n").decode("ascii")
            self.addheader(name.decode("ascii"), text, 0)
        return _ACTIONS[action]

    def abort(self) -> int:
        try:
            self.session.abort()
        except Exception:
            log.exception("abort callback failed")
        return Milter.CONTINUE

    def close(self) -> int:
        try:
            self.session.close()
        except Exception:
            log.exception("close callback failed")
        finally:
            self.controller.metrics.connections_open.dec()
            self.live.discard(self)
        return Milter.CONTINUE

    @Milter.nocallback
    def unknown(self, cmd: str) -> int:
        return Milter.CONTINUE


STOP_GRACE = 25.0  # seconds messages in progress get at SIGTERM (Docker waits 10 s by default)


def _stop_libmilter(fds: set[int]) -> None:
    """smfi_stop() without its wait: it blocks on a lock that libmilter's listener holds across
    a 5-second poll(). Stop from a helper thread and wake that poll with connections of our
    own. (A shutdown() of the listening socket would be quicker, but libmilter takes the poll
    error as a failure and aborts every open session.)"""
    stopper = threading.Thread(target=Milter.stop, name="milter-stop", daemon=True)
    stopper.start()
    addresses = []
    for fd in fds:
        try:
            with socket.socket(fileno=os.dup(fd)) as listener:
                family, address = listener.family, listener.getsockname()
        except OSError:
            continue
        if family in (socket.AF_INET, socket.AF_INET6) and address[0] in ("0.0.0.0", "::"):
            address = ("127.0.0.1" if family == socket.AF_INET else "::1", address[1])
        addresses.append((family, address))
    for _ in range(40):
        for family, address in addresses:
            with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(address)
        stopper.join(0.05)
        if not stopper.is_alive():
            return


def _listen_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.add(int(name))
    return fds


def _set_nodelay(fds: set[int]) -> None:
    """TCP_NODELAY on libmilter's listening socket; Linux passes it on to accepted sockets.

    libmilter writes a reply (and our DKIM-Signature header) in small writes; with Nagle on,
    the last one waits for the MTA's delayed ACK, about 40 ms a message (issue 7).
    """
    for fd in fds:
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with s:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Service:
    """The process: milter thread, metrics endpoint, key refresh, signals."""

    def __init__(self, config_path: str | None, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.controller = Controller(config_path, config, self.metrics)
        self.reporter = Reporter(
            self.metrics, lambda: self.controller.current.config.metrics.per_domain_labels
        )
        # Plain flags, not Events: a signal handler that takes a lock can deadlock with the
        # code it interrupted (Event.wait holds the same lock). The main loop polls them.
        self._stop = False
        self._reloads_asked = 0
        self._milter_done = threading.Event()

    def run(self) -> int:
        config = self.config
        event(
            logging.INFO,
            "starting",
            version=__version__,
            listen=str(config.listen),
            config=self.controller.config_path or "<built-in defaults>",
        )
        if config.metrics.listen is not None:
            ml = config.metrics.listen
            family = socket.AF_INET6 if ml.kind is ListenKind.INET6 else socket.AF_INET
            assert ml.host is not None and ml.port is not None
            try:
                serve_http(ml.host, ml.port, family, self.metrics, self.controller.readiness)
            except OSError as exc:
                # the health checks would fail anyway: say why and stop before taking mail
                event(
                    logging.ERROR, "cannot listen for metrics", listen=str(ml), error=exc.strerror
                )
                return 1
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)

        SidecarMilter.controller = self.controller
        SidecarMilter.reporter = self.reporter
        Milter.factory = SidecarMilter
        policy = Milter.TEMPFAIL if config.on_error is OnError.TEMPFAIL else Milter.ACCEPT
        Milter.set_exception_policy(policy)
        Milter.set_flags(Milter.ADDHDRS | Milter.SETSYMLIST)
        listen = config.listen
        if listen.kind is ListenKind.UNIX and listen.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen.path)
        _set_callbacks()
        Milter.setconn(listen.to_libmilter())
        Milter.settimeout(600)
        _set_max_command_size(max(config.limits.max_header_bytes, 1 << 20) + 65536)
        Milter.register(
            "dkim-sidecar",
            data=_pass_on("data"),
            unknown=_pass_on("unknown"),
            negotiate=Milter.negotiate_callback,
        )
        before = _listen_fds()
        try:
            Milter.opensocket(True)
        except Milter.milter.error:
            event(
                logging.ERROR, "cannot listen (address in use, or not allowed?)", listen=str(listen)
            )
            return 1
        listen_fds = _listen_fds() - before
        _set_nodelay(listen_fds)
        thread = threading.Thread(target=self._milter_main, name="milter", daemon=True)
        thread.start()
        self.controller.listening = True
        event(logging.INFO, "listening", listen=str(listen))
        # after the milter socket: mail is answered first, keys follow at once
        self.controller.start_refresher()
        # computed at each scrape, so it always agrees with /readyz
        self.metrics.ready.set_function(lambda: 1.0 if self.controller.readiness()[0] else 0.0)

        reloads_done = 0
        while not self._stop and not self._milter_done.is_set():
            time.sleep(0.05)
            if self._reloads_asked != reloads_done:
                reloads_done = self._reloads_asked  # a storm of SIGHUPs is one reload
                self.controller.reload()
        event(logging.INFO, "stopping: no new connections; finishing messages in progress")
        self.controller.stop()
        # Not smfi_stop() first: once smfi_main() returns, pymilter no longer calls into
        # Python and the sessions still open are dropped. So: let new connections go at
        # connect (unsigned, as if we were down), wait (bounded) for the messages in
        # progress, then stop libmilter.
        self.controller.draining = True
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(
            m.session.in_progress for m in list(SidecarMilter.live)
        ):
            time.sleep(0.05)
        busy = sum(1 for m in list(SidecarMilter.live) if m.session.in_progress)
        _stop_libmilter(listen_fds)
        thread.join(timeout=5)
        event(logging.INFO, "stopped", unfinished_messages=busy)
        return 0 if self._stop else 1

    def _on_hup(self, signum: int, frame: object) -> None:
        self._reloads_asked += 1

    def _on_stop(self, signum: int, frame: object) -> None:
        self._stop = True

    def _milter_main(self) -> None:
        try:
            Milter.milter.main()
        except Milter.milter.error as exc:
            event(logging.ERROR, "milter stopped", error=str(exc))
        finally:
            self._milter_done.set()


def _set_max_command_size(size: int) -> None:
    """Let libmilter take commands up to `size` bytes (its default is 64 KB).

    Postfix sends each header field in one command, up to its header_size_limit (100 KB by
    default); libmilter drops the whole connection on a command over its limit (SMFIC_TOOBIG),
    and the MTA then falls back to its default action. pymilter does not wrap
    smfi_setmaxdatasize(), so it is called on the libmilter that pymilter's module links.
    """
    try:
        setter = ctypes.CDLL(Milter.milter.__file__).smfi_setmaxdatasize
    except (OSError, AttributeError):
        event(logging.WARNING, "cannot raise libmilter's 64 KB command limit")
        return
    setter.argtypes = [ctypes.c_size_t]
    setter.restype = ctypes.c_size_t
    setter(size)


def _set_callbacks() -> None:
    """What Milter.runmilter sets up, without its opensocket/main (we need the socket)."""
    m = Milter.milter
    m.set_connect_callback(Milter.connect_callback)
    m.set_helo_callback(_pass_on("hello"))
    m.set_envfrom_callback(_pass_on("envfrom_bytes"))
    m.set_envrcpt_callback(_pass_on("envrcpt_bytes"))
    m.set_header_callback(_pass_on("header_bytes", Milter.CONTINUE))
    m.set_eoh_callback(_pass_on("eoh"))
    m.set_body_callback(_pass_on("body"))
    m.set_eom_callback(_pass_on("eom"))
    m.set_abort_callback(_pass_on("abort", Milter.CONTINUE))
    m.set_close_callback(Milter.close_callback)


def _pass_on(method: str, orphan: int = Milter.ACCEPT) -> Callable[..., int]:
    """The libmilter callback for one event: the connection's SidecarMilter handles it.

    An MTA that sends MAIL, a header or an unknown command before any option negotiation or
    connect (or after QUIT_NC) has no SidecarMilter yet: no client address, nothing to sign,
    so the event gets `orphan` (accept; continue where no reply is expected) instead of an
    AttributeError in the log.
    """

    def callback(ctx: Any, *args: Any) -> int:
        milter = ctx.getpriv()
        if milter is None:
            return orphan
        return int(getattr(milter, method)(*args))

    callback.__name__ = method
    return callback
