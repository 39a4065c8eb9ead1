"""The real `dkim-sidecar run` as a subprocess: config file, keys, ports, signals, log.

Tests talk to it as Postfix would (milter/client.py) or through a real Postfix, scrape its HTTP
endpoint, and send it real signals.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from dkim_sidecar.dkim.keys import SigningKey
from dkim_sidecar.milter.client import MilterClient, Result

from . import leaks
from .ports import free_port
from .promql import Catalogue


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def clean_env(**given: str) -> dict[str, str]:
    """The environment for a sidecar or CLI process a test starts: nothing from the host's but
    where programs are. A REDISPASS, a proxy or a DKIM_SIDECAR_* override there must not change
    what the test set up; what the test gives is all the process sees besides."""
    return {
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        **given,
    }


# Every process any Sidecar started: a test that fails half-way does not stop its own, and
# none may outlive the session (conftest kills what is left).
_STARTED: list[subprocess.Popen[bytes]] = []


def kill_leftovers() -> None:
    """SIGKILL every sidecar process still running."""
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _STARTED.clear()


class Sidecar:
    """One dkim-sidecar process under a temp dir."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        hosts: Path | None = None,
    ) -> None:
        """`hosts`: a file the process sees as /etc/hosts (a mount namespace of its own), so a
        test controls what host names resolve to, as Docker's DNS would."""
        self.dir = workdir
        self.hosts = hosts
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        self.config = {
            "listen": f"inet:127.0.0.1:{self.port}",
            "metrics": {"listen": f"inet:127.0.0.1:{self.metrics_port}"},
            **config,
        }
        self.config_path = self.dir / "config.yml"
        self.log_path = self.dir / "sidecar.log"
        self.env = env or {}
        for name, value in self.env.items():
            if "PASS" in name.upper():
                leaks.secret(value)
        leaks.output(self.log_path)
        leaks.output(self.dir / "http-at-stop.txt")
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()

    @property
    def milter(self) -> str:
        listen = str(self.config["listen"])
        return listen if listen.startswith("unix:") else f"inet:127.0.0.1:{self.port}"

    @property
    def postfix_milter(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, wait_ready: bool = True) -> Sidecar:
        env = clean_env(**self.env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        argv = [sys.executable, "-m", "dkim_sidecar.cli", "run", "--config", str(self.config_path)]
        if self.hosts is not None:
            # A name not in the hosts file goes to DNS: a resolver of its own that answers at
            # once (nothing listens on 127.0.0.1:53), so no lookup waits on the host's DNS.
            resolv = self.dir / "resolv.conf"
            resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            # unshare and sh exec into the sidecar: the PID stays the sidecar's
            argv = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/resolv.conf && '
                'shift && exec "$@"',
                str(self.hosts),
                str(resolv),
                *argv,
            ]
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.dir,
        )
        _STARTED.append(self.proc)
        # generous: a loaded machine may take seconds to start Python
        wait_for(self.listening, 60, "the milter to listen")
        if wait_ready:
            wait_for(lambda: self.http("/readyz")[0] == 200, 60, "/readyz")
        return self

    def listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"dkim-sidecar exited with {self.proc.returncode}:\n{self.log()}")
        try:
            if self.milter.startswith("unix:"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.5)
                    s.connect(self.milter[5:])
                return True
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def http(self, path: str) -> tuple[int, str]:
        """(status, body) of a GET on the metrics port; (0, "") when nothing answers, or no
        whole answer (a process starting or dying: a refused connection, a closed one, a short
        body). Straight to 127.0.0.1: an http_proxy in the environment is not asked."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read().decode()
        except (OSError, http.client.HTTPException):
            return 0, ""
        finally:
            conn.close()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample from /metrics (see metric_sample)."""
        return metric_sample(lambda: self.http("/metrics"), name, labels)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 30, count: int = 1) -> None:
        wait_for(lambda: self.log().count(text) >= count, timeout, f"log line {text!r}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def reload(self, timeout: float = 30) -> None:
        n = self.log().count("config reloaded") + self.log().count("reload failed")
        self.signal(signal.SIGHUP)
        wait_for(
            lambda: self.log().count("config reloaded") + self.log().count("reload failed") > n,
            timeout,
            "the reload",
        )

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            # what it answered over HTTP goes to the end-of-run secret scan (harness.leaks)
            answers = [self.http(p)[1] for p in ("/metrics", "/readyz", "/healthz")]
            (self.dir / "http-at-stop.txt").write_text("\n".join(answers))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None:
            self._log.close()  # a restart opens it again

    # --- driving it as an MTA ----------------------------------------------------------------

    def client(self, source: str | None = None) -> MilterClient:
        c = MilterClient(self.milter, timeout=30, source=source)
        c.negotiate()
        return c

    def send(
        self,
        message: bytes,
        client_ip: str = "192.0.2.10",
        *,
        source: str | None = None,
        **kw: Any,
    ) -> Result:
        """One connection (from the local address `source`, if given), one message: the
        Result says what the milter did."""
        with self.client(source) as c:
            r = c.connect(client_ip)
            if r != "continue":
                return Result(r, "connect", message=message)
            return c.send_message(message, **kw)


@cache
def _catalogue() -> Catalogue:
    return Catalogue()


def metric_sample(
    fetch: Callable[[], tuple[int, str]], name: str, labels: Mapping[str, str]
) -> float:
    """One sample of a sidecar's /metrics, `fetch`ed as (status, text); 0 for a sample the
    sidecar can export but has not yet (a labelled counter not yet incremented). The name, the
    label names and the label values are first held against what the code exports
    (harness.promql.Catalogue): a typo in any of them raises, as does an endpoint that does not
    answer, so a `== 0` cannot pass on a typo or a dead endpoint."""
    catalogue = _catalogue()
    family = catalogue.family_of.get(name)
    if family is None:
        raise LookupError(f"the sidecar exports no metric {name!r}")
    have = set(catalogue.labels[family]) | ({"le"} if name.endswith("_bucket") else set())
    if set(labels) != have:
        raise LookupError(f"{name} has the labels {sorted(have)}, not {sorted(labels)}")
    for label, value in labels.items():
        known = catalogue.values_of(family, label)  # None: any value (a domain)
        if known is not None and value not in known:
            raise LookupError(f"{name}{{{label}={value!r}}}: the sidecar never sets it")
    status, text = fetch()
    if status != 200:
        raise RuntimeError(f"/metrics of the sidecar answered {status or 'nothing'}")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    if family not in families:  # the process runs other code than the catalogue read
        raise LookupError(f"/metrics of the process exports no metric {name!r}")
    for sample in families[family].samples:
        if sample.name == name and sample.labels == dict(labels):
            return float(sample.value)
    return 0.0


def dns_table(keys: list[SigningKey]) -> dict[str, str]:
    return {k.dns_name: k.dns_record() for k in keys}


def write_keys(directory: Path, keys: list[tuple[str, str, bytes]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for domain, selector, pem in keys:
        leaks.secret_pem(pem)
        path = directory / f"{domain}.{selector}.key"
        path.write_bytes(pem)
        path.chmod(0o600)


def milter_reply(address: str, source: str, client_ip: str) -> bytes | None:
    """Negotiate and connect from the local address `source`, claiming `client_ip`: the
    milter's answer to the connect, or None when it closed the connection unanswered."""
    from dkim_sidecar.milter.codec import ProtocolError

    try:
        with MilterClient(address, timeout=10, source=source) as c:
            c.negotiate()
            return c.connect(client_ip).encode()
    except (ProtocolError, ConnectionError):
        return None
