"""Prometheus metrics and the HTTP endpoint (/metrics, /healthz, /readyz).

Names follow Prometheus practice: one prefix, `_total` counters, `_seconds` and `_bytes`
histograms; every label takes a small fixed set of values. A per-domain label exists only when
the config asks for it (metrics.per_domain_labels), since the domain list can grow.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from . import __version__

log = logging.getLogger("dkim_sidecar")


class Metrics:
    """All metrics of one process, in their own registry (tests build several)."""

    def __init__(self) -> None:
        # no *_created series: they double the series count and no dashboard or alert uses them
        disable_created_metrics()  # type: ignore[no-untyped-call]
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "dkim_sidecar_"
        self.messages = Counter(
            p + "messages_total",
            "Messages by outcome (signed, skipped, error, aborted) and reason; not_relay "
            "counts connections, which are let go at connect",
            ["outcome", "reason"],
            registry=r,
        )
        self.domain_messages = Counter(
            p + "domain_messages_total",
            "Messages by signing domain and outcome (only with metrics.per_domain_labels)",
            ["domain", "outcome"],
            registry=r,
        )
        self.signatures = Counter(
            p + "signatures_total", "DKIM signatures added, by algorithm", ["algorithm"], registry=r
        )
        self.sign_seconds = Histogram(
            p + "sign_duration_seconds",
            "Time to hash the header and sign one message (all its signatures)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.message_bytes = Histogram(
            p + "message_size_bytes",
            "Body size of signed messages",
            buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864),
            registry=r,
        )
        self.keys_loaded = Gauge(
            p + "keys_loaded",
            "Signing keys in the current snapshot, by source",
            ["source"],
            registry=r,
        )
        self.key_problems = Gauge(
            p + "key_problems",
            "Key problems in the current snapshot: keys skipped (unreadable, too small...) or "
            "not matching their published record",
            registry=r,
        )
        self.key_refreshes = Counter(
            p + "key_refreshes_total",
            "Key refreshes by result: ok, partial (a source unreachable: its last keys kept), "
            "failed",
            ["result"],
            registry=r,
        )
        self.key_refresh_last_success = Gauge(
            p + "key_refresh_last_success_timestamp_seconds",
            "When all key sources last answered",
            registry=r,
        )
        self.relay_networks_outside_forwarding_hosts = Gauge(
            p + "relay_networks_outside_forwarding_hosts",
            "Relay networks that no Mailcow forwarding host covers: Mailcow's rspamd rejects "
            "their mail with From: a Mailcow domain before the sidecar signs it (0 without "
            "a Redis source)",
            registry=r,
        )
        self.redis_up = Gauge(
            p + "redis_up",
            "1 when the last read from Redis worked (no Redis source: 0)",
            registry=r,
        )
        self.reloads = Counter(
            p + "config_reloads_total", "Config reloads (SIGHUP) by result", ["result"], registry=r
        )
        self.reload_last_success = Gauge(
            p + "config_last_reload_success_timestamp_seconds",
            "When the running config was last loaded successfully",
            registry=r,
        )
        self.connections_open = Gauge(
            p + "milter_connections_open", "Milter connections from the MTA now open", registry=r
        )
        self.connections_refused = Counter(
            p + "milter_connections_refused_total",
            "Milter connections closed unanswered: the peer is not in mta_peers",
            registry=r,
        )
        self.ready = Gauge(
            p + "ready", "1 when the milter listens and a key snapshot is loaded", registry=r
        )
        self.build_info = Gauge(
            p + "build_info", "Always 1; the version as a label", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        for algorithm in ("rsa-sha256", "ed25519-sha256"):
            self.signatures.labels(algorithm)
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        for result in ("ok", "partial", "failed"):
            self.key_refreshes.labels(result)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/readyz":
            ready, why = self.server.readiness()
            self._send(200 if ready else 503, (why + "\n").encode())
        else:
            self._send(404, b"not found\n")

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every few seconds would drown the per-message lines


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        family: int,
        metrics: Metrics,
        readiness: Callable[[], tuple[bool, str]],
    ) -> None:
        self.address_family = family
        self.metrics = metrics
        self.readiness = readiness
        super().__init__(address, _Handler)


def serve_http(
    host: str, port: int, family: int, metrics: Metrics, readiness: Callable[[], tuple[bool, str]]
) -> ThreadingHTTPServer:
    """Start the metrics and health endpoint in a daemon thread."""
    server = _Server((host, port), family, metrics, readiness)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
