"""A throwaway redis-server for tests, and helpers that write data exactly as Mailcow does.

`RedisServer` runs Debian's ``redis-server`` on a free 127.0.0.1 port with ``requirepass``,
no persistence (``save ""``, ``appendonly no``) and its own temporary directory. It is started
and stopped by PID (never by name), can be killed hard (``kill()``, SIGKILL), frozen
(``freeze()``, SIGSTOP: a Redis that accepts connections but never answers) and restarted on
the same port (``restart()``), for outage tests. It does not depend on pytest.

The password goes into a 0600 config file, not the command line, so it never shows in ``ps``
(as Mailcow does: ``data/conf/redis/redis-conf.sh`` writes ``requirepass`` into a file).

The ``seed_*`` helpers mirror Mailcow's PHP (mailcow-dockerized):

- ``data/web/inc/functions.dkim.inc.php``: ``DKIM_PUB_KEYS[domain]`` = the public key PEM
  without its armour lines, joined; ``DKIM_SELECTORS[domain]`` = selector;
  ``DKIM_PRIV_KEYS["<selector>.<domain>"]`` = the private key PEM, trimmed, CR LF turned into LF.
  An import first deletes the domain's old entries (`dkim('delete')`), so do we.
- ``data/web/inc/functions.fwdhost.inc.php``: ``WHITELISTED_FWD_HOST[host]`` = what the admin
  typed; ``KEEP_SPAM[host]`` = ``1`` when the spam filter is off for that host.
- ``data/web/inc/functions.mailbox.inc.php``: ``DOMAIN_MAP[domain]`` = ``1`` for every domain
  and alias domain Mailcow hosts (rspamd's MAILCOW_DOMAIN_HEADER_FROM reads it).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from cryptography.hazmat.primitives import serialization

from . import leaks
from .ports import free_port

__all__ = [
    "RedisServer",
    "free_port",
    "mailcow_pub_b64",
    "seed_domain",
    "seed_ed25519",
    "seed_forwarding_host",
    "seed_forwarding_name",
    "seed_mailcow",
]

REDIS_SERVER = "/usr/bin/redis-server"


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup (garbage collection or interpreter exit): never leave a server."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class RedisServer:
    """One redis-server process on loopback. Use as a context manager, or call start()/close()."""

    def __init__(
        self,
        password: str | None = None,
        *,
        host: str = "127.0.0.1",
        executable: str = REDIS_SERVER,
        extra_config: Sequence[str] = (),
        start_timeout: float = 60.0,
    ) -> None:
        self.password = password if password is not None else secrets.token_urlsafe(18)
        leaks.secret(self.password)
        self.host = host
        self.executable = executable
        self.extra_config = tuple(extra_config)
        self.start_timeout = start_timeout
        self.port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        if self._dir is None:
            raise RuntimeError("server was never started")
        return self._dir / "redis.log"

    def start(self) -> RedisServer:
        """Start on a free port (or on the previous one after stop/kill) and wait for PING."""
        if self.running:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="redis-harness-"))
        if not self.port:
            self.port = free_port(self.host)
        conf = self._dir / "redis.conf"
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            f"requirepass {self.password}",
            'save ""',
            "appendonly no",
            f"dir {self._dir}",
            f"logfile {self._dir / 'redis.log'}",
            "daemonize no",
            "protected-mode yes",
            *self.extra_config,
        ]
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._proc = subprocess.Popen(
            [self.executable, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._finalizer = weakref.finalize(self, _reap, self._proc)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        # a loaded machine may take seconds to answer the first PING
        client = self.client(socket_timeout=5.0, socket_connect_timeout=5.0)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self._proc.returncode} on {self.address}:\n"
                        + self._log_tail()
                    )
                try:
                    if client.ping():
                        return
                # not up yet, or too slow to answer: redis-py 8's TimeoutError is no
                # ConnectionError
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"redis-server on {self.address} not ready after {self.start_timeout} s:\n"
                        + self._log_tail()
                    )
                time.sleep(0.01)
        finally:
            client.close()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]).replace(self.password, "***")

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM by PID and wait; SIGKILL if it does not go within `timeout`."""
        if self._proc is None:
            return
        # a frozen process keeps SIGTERM pending until it runs again
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL by PID (an abrupt outage: no shutdown, open connections reset)."""
        if self._proc is None:
            return
        self._signal(signal.SIGKILL)
        self._proc.wait(timeout=10)
        self._proc = None

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, but nothing ever answers."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        """Stop (if running) and start again on the same port, with an empty keyspace."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"RedisServer({self.address}, {state})"

    # -- clients ---------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client as the admin (default user, the server's password), bytes replies."""
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "password": self.password,
            "decode_responses": False,
            "socket_timeout": 5.0,
            "socket_connect_timeout": 5.0,
        }
        options.update(kwargs)
        return redis.Redis(**options)


# -- Mailcow's data layout ---------------------------------------------------------------------


def mailcow_pub_b64(pem: bytes) -> str:
    """DKIM_PUB_KEYS as Mailcow computes it: the public key PEM without its first and last
    line, joined (functions.dkim.inc.php, `add` and `import`)."""
    key = serialization.load_pem_private_key(pem, password=None)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    lines = [line for line in public.decode("ascii").split("\n") if line]
    return "".join(lines[1:-1])


def seed_mailcow(client: redis.Redis, domain: str, selector: str, pem: bytes, pub_b64: str) -> None:
    """Store a DKIM key the way Mailcow's `dkim('import')` does."""
    leaks.secret_pem(pem)
    old = client.hget("DKIM_SELECTORS", domain)
    if isinstance(old, bytes):
        # dkim('delete'): the old selector's private key goes with it
        client.hdel("DKIM_PUB_KEYS", domain)
        client.hdel("DKIM_PRIV_KEYS", old + b"." + domain.encode())
        client.hdel("DKIM_SELECTORS", domain)
    # PHP trim(), then preg_replace('~\r\n?~', "\n", ...)
    normalized = re.sub(rb"\r\n?", b"\n", pem.strip())
    client.hset("DKIM_PUB_KEYS", domain, pub_b64)
    client.hset("DKIM_SELECTORS", domain, selector)
    client.hset("DKIM_PRIV_KEYS", f"{selector}.{domain}", normalized)


def seed_ed25519(
    client: redis.Redis,
    domain: str,
    selector: str,
    data: bytes,
    prefix: str = "DKIM_ED25519_",
) -> None:
    """Store an Ed25519 key (PEM or base64 seed) under the sidecar's own convention, beside
    Mailcow's RSA key: `<prefix>SELECTORS[domain]`, `<prefix>PRIV_KEYS["<selector>.<domain>"]`."""
    leaks.secret_pem(data)
    client.hset(prefix + "SELECTORS", domain, selector)
    client.hset(prefix + "PRIV_KEYS", f"{selector}.{domain}", data)


def seed_forwarding_host(
    client: redis.Redis, host: str, *, keep_spam: bool, source: str | None = None
) -> None:
    """Store a forwarding host the way Mailcow's `fwdhost('add')` does for an IP or CIDR."""
    client.hset("WHITELISTED_FWD_HOST", host, source if source is not None else host)
    if keep_spam:
        client.hset("KEEP_SPAM", host, 1)
    else:
        client.hdel("KEEP_SPAM", host)


def seed_forwarding_name(
    client: redis.Redis, name: str, networks: list[str], *, keep_spam: bool
) -> None:
    """Store a forwarding host typed as a host NAME, as Mailcow's `fwdhost('add')` does: it
    expands the name into that domain's outgoing networks (`get_outgoing_hosts_best_guess`)
    and stores each of them with the name typed as its value."""
    for network in networks:
        seed_forwarding_host(client, network, keep_spam=keep_spam, source=name)


def seed_domain(client: redis.Redis, domain: str) -> None:
    """Mark a domain as hosted by Mailcow, as adding a domain (or alias domain) in the UI does."""
    client.hset("DOMAIN_MAP", domain, 1)
