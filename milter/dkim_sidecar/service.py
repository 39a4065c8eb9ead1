"""The process around the milter server: signals, reloads, the metrics endpoint, a clean stop.

The milter protocol itself is served by milter/server.py from one asyncio event loop in the
main thread, with a Session (session.py) as each connection's handler. Next to it run the
key-refresh thread (runtime.Controller) and the metrics HTTP server; a SIGHUP reload runs in a
worker thread, so that reading keys from Redis never holds up mail.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from . import __version__
from .config import Config
from .dkim.canon import scan_helper
from .logs import event
from .metrics import Metrics, serve_http
from .milter import codec as p
from .milter.address import ListenKind
from .milter.api import Options
from .milter.server import MilterServer
from .peers import MtaGate, unguarded_listen_warning
from .runtime import Controller
from .session import MessageReport, Reason, Session

log = logging.getLogger("dkim_sidecar")


class Reporter:
    """Turns each MessageReport into its one log line and its metrics."""

    def __init__(self, metrics: Metrics, per_domain: Callable[[], bool]) -> None:
        self.metrics = metrics
        self.per_domain = per_domain
        # the labelled children, looked up once each (a labels() call takes a lock)
        self._by_reason: dict[Reason, Any] = {}
        self._by_algorithm: dict[str, Any] = {}

    def __call__(self, r: MessageReport) -> None:
        m = self.metrics
        reason = r.reason
        counter = self._by_reason.get(reason)
        if counter is None:
            counter = self._by_reason[reason] = m.messages.labels(reason.outcome, reason.value)
        counter.inc()
        if reason is Reason.NOT_RELAY and r.queue_id is None:
            # inbound Internet mail: let go at connect, not worth a line each at info level
            event(logging.DEBUG, "not a relay client", client=r.client_ip)
            return
        algorithms = ",".join(k.algorithm.value for k in r.keys) or None
        if reason is Reason.SIGNED:
            for k in r.keys:
                alg = k.algorithm.value
                signatures = self._by_algorithm.get(alg)
                if signatures is None:
                    signatures = self._by_algorithm[alg] = m.signatures.labels(alg)
                signatures.inc()
            m.sign_seconds.observe(r.sign_seconds)
            m.message_bytes.observe(r.size)
        if r.domain and reason is not Reason.NO_KEY and self.per_domain():
            # a signing domain, one of ours: not a no_key message's author domain, which the
            # client writes (any number of them would become label values)
            m.domain_messages.labels(r.domain, reason.outcome).inc()
        event(
            logging.WARNING if reason is Reason.ERROR else logging.INFO,
            reason.outcome,
            queue_id=r.queue_id,
            client=r.client_ip,
            reason=reason.value,
            action=r.action.value,
            domain=r.domain,
            selectors=",".join(k.selector for k in r.keys) or None,
            algorithms=algorithms,
            size=r.size or None,
            ms=round(r.duration * 1000, 2),
            error=r.detail,
        )


def event_loop() -> tuple[Callable[[Coroutine[Any, Any, int]], int], str]:
    """uvloop (libuv, in C) where it is installed, the standard asyncio loop otherwise.

    Each message is several wake-ups of the loop (through Postfix, strace counts five reads
    per message, as Postfix buffers the packets that need no reply, and four replies); uvloop's
    wake-up costs a fraction of asyncio's Python one. Measured through a real Postfix, side by
    side: about 10% less milter CPU per message, all else the same (docs/design.md).
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run, "asyncio"
    return uvloop.run, "uvloop"


# What the sessions ask of the MTA, negotiated per connection from what it offers:
# - header values with their exact leading space (SMFIP_HDR_LEADSPC): DKIM signs bytes, so
#   nothing is rebuilt as `name + ": " + value`; an MTA that cannot give them exactly gets no
#   signature (Reason.INEXACT_HEADERS);
# - no HELO, RCPT or unknown-command events;
# - replies only where a decision is due: at connect (clients outside the relay networks are
#   let go there), at DATA and at end of message. MAIL, header, end-of-header and body packets
#   get none (SMFIP_NR_*): the MTA streams them without waiting on us. A decision taken there
#   (an authenticated sender at MAIL, no key at the end of the header) is the answer to the
#   next command that has a reply. Fewer round trips cost both sides less CPU (measured
#   through Postfix, docs/design.md); the price is that a message let go at the end of its
#   header still has its body sent to us;
# - the DATA step is answered, not skipped: Postfix then sends the header without waiting on a
#   delayed ACK (a skipped DATA step stalls each message ~40 ms);
# - adding header fields (SMFIF_ADDHDRS), without which there is nothing to do (an MTA that does
#   not offer it gets every connection let go at connect);
# - the macros read are asked for (SMFIR_SETSYMLIST), so Mailcow's `milter_*_macros` lines do
#   not matter: `{auth_authen}` at MAIL, `i` (queue ID) at end of header and end of message.
MILTER_PROTOCOL = (
    p.P_NOHELO
    | p.P_NORCPT
    | p.P_NOUNKNOWN
    | p.P_NR_MAIL
    | p.P_NR_HDR
    | p.P_NR_EOH
    | p.P_NR_BODY
    | p.P_HDR_LEADSPC
)
MILTER_ACTIONS = p.F_ADDHDRS | p.F_SETSYMLIST
MILTER_MACROS = {p.M_ENVFROM: "{auth_authen}", p.M_EOH: "i", p.M_EOM: "i"}


def milter_options(max_packet: int) -> Options:
    return Options(MILTER_PROTOCOL, MILTER_ACTIONS, p.F_ADDHDRS, MILTER_MACROS, max_packet)


STOP_GRACE = 25.0  # seconds messages in progress get at SIGTERM (Docker waits 10 s by default)


class Service:
    """The process: milter server, metrics endpoint, key refresh, signals."""

    def __init__(self, config_path: str | None, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.controller = Controller(config_path, config, self.metrics)
        self.reporter = Reporter(
            self.metrics, lambda: self.controller.current.config.metrics.per_domain_labels
        )
        self._stop: asyncio.Event | None = None
        self._server: MilterServer | None = None
        self._reload_running = False
        self._reload_again = False

    def run(self) -> int:
        config = self.config
        run, loop_name = event_loop()
        event(
            logging.INFO,
            "starting",
            version=__version__,
            listen=str(config.listen),
            config=self.controller.config_path or "<built-in defaults>",
            loop=loop_name,
            # the body path: the C helper's SIMD level, or "python" if it did not build
            body_scan=scan_helper.SIMD if scan_helper is not None else "python",
        )
        warning = unguarded_listen_warning(config)
        if warning is not None:
            event(logging.WARNING, warning)
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
        return run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)

        config = self.config
        listen = config.listen
        max_packet = self.controller.max_packet
        controller, reporter, metrics = self.controller, self.reporter, self.metrics

        def new_session(exact_headers: bool) -> Session:
            return Session(lambda: controller.current, reporter, exact_headers=exact_headers)

        gate = MtaGate(lambda: controller.peers, metrics.connections_refused.inc)
        server = self._server = MilterServer(new_session, milter_options(max_packet), gate)
        metrics.connections_open.set_function(lambda: len(server.connections))
        try:
            await server.start(listen)
        except OSError as exc:
            event(
                logging.ERROR,
                "cannot listen (address in use, or not allowed?)",
                listen=str(listen),
                error=exc.strerror,
            )
            return 1
        self.controller.listening = True
        event(logging.INFO, "listening", listen=str(listen))
        # after the milter socket: mail is answered first, keys follow at once
        self.controller.start_refresher()
        # computed at each scrape, so it always agrees with /readyz
        self.metrics.ready.set_function(lambda: 1.0 if self.controller.readiness()[0] else 0.0)

        await self._stop.wait()
        event(
            logging.INFO, "stopping: new connections pass unsigned; finishing messages in progress"
        )
        self.controller.stop()
        # New connections are let go at connect (unsigned, as if we were down) while the
        # messages in progress finish, within a bound; then the socket closes.
        server.draining = True
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and server.in_progress():
            await asyncio.sleep(0.05)
        busy = server.in_progress()
        await server.close()
        event(logging.INFO, "stopped", unfinished_messages=busy)
        return 0

    def _on_hup(self) -> None:
        """SIGHUP: reload in a worker thread; a storm of SIGHUPs is one more reload."""
        if self._reload_running:
            self._reload_again = True
            return
        self._reload_running = True
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.controller.reload)
        future.add_done_callback(self._reload_done)

    def _reload_done(self, future: asyncio.Future[bool]) -> None:
        self._reload_running = False
        if future.exception() is not None:
            log.error("reload failed", exc_info=future.exception())
        elif self._server is not None:
            self._server.recheck_peers()  # a narrowed mta_peers applies to open connections too
        if self._reload_again:
            self._reload_again = False
            self._on_hup()
