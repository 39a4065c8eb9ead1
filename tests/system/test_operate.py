"""Operating the sidecar: a real process, real signals, real HTTP."""

from __future__ import annotations

import errno
import json
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from dkim_sidecar import __version__
from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from dkim_sidecar.milter.client import MilterClient
from harness.dkimcheck import verify_all
from harness.procfs import socket_nodelay
from harness.sidecar import Sidecar, dns_table, wait_for, write_keys

RELAY = "192.0.2.10"
OTHER = "198.51.100.20"

MESSAGE = b"From: <a@example.com>\r\nTo: <b@example.net>\r\nSubject: ops\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def pem() -> bytes:
    return generate_key(Algorithm.RSA_SHA256, 1024)


def make(tmp_path: Path, pem: bytes, **config) -> Sidecar:
    write_keys(tmp_path / "keys", [("example.com", "s1", pem)])
    base = {"relay_networks": [RELAY + "/32"], "keys": {"directory": str(tmp_path / "keys")}}
    base.update(config)
    return Sidecar(tmp_path, base)


def test_milter_connections_have_tcp_nodelay(tmp_path: Path, pem: bytes) -> None:
    """Every reply is one write; with Nagle on, one written while Postfix's ACK of the previous
    is delayed would wait ~40 ms for it (docs/design.md). Read on the sidecar's own accepted socket,
    in the running process (pidfd_getfd). uvloop and asyncio set the flag too, so this checks
    the outcome (nothing of ours turns it off), whoever sets it."""
    s = make(tmp_path, pem).start()
    try:
        with MilterClient(s.milter) as c:
            c.negotiate()
            c.connect(RELAY)  # answered: the sidecar has accepted the connection
            try:
                found = [x for x in socket_nodelay(s.proc.pid, s.port) if x[0] == "established"]
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOSYS):  # no ptrace rights / old kernel
                    pytest.skip(f"pidfd_getfd: {exc.strerror}")
                raise
            assert found == [("established", True)]
    finally:
        s.stop()


def test_metrics_move_with_messages_and_health_endpoints_answer(tmp_path: Path, pem: bytes) -> None:
    s = make(tmp_path, pem).start()
    try:
        assert s.http("/healthz") == (200, "ok\n")
        assert "loop=uvloop" in s.log()  # the installed dependency is the loop in use
        # the C helper was built and loads (it is optional: a failed build would only be slow)
        assert "body_scan=python" not in s.log() and "body_scan=" in s.log()
        assert s.http("/readyz")[0] == 200
        assert s.http("/nope")[0] == 404
        assert s.metric("dkim_sidecar_build_info", version=__version__) == 1
        assert s.metric("dkim_sidecar_keys_loaded", source="directory") == 1
        assert s.metric("dkim_sidecar_key_refresh_last_success_timestamp_seconds") > 0
        dns = dns_table([SigningKey.load("example.com", "s1", pem)])
        for _ in range(3):
            assert verify_all(s.send(MESSAGE, RELAY).message, dns) == [True]
        s.send(MESSAGE, OTHER)
        assert s.metric("dkim_sidecar_messages_total", outcome="signed", reason="signed") == 3
        assert s.metric("dkim_sidecar_messages_total", outcome="skipped", reason="not_relay") == 1
        assert s.metric("dkim_sidecar_signatures_total", algorithm="rsa-sha256") == 3
        assert s.metric("dkim_sidecar_sign_duration_seconds_count") == 3
        assert s.metric("dkim_sidecar_message_size_bytes_count") == 3
        wait_for(lambda: s.metric("dkim_sidecar_milter_connections_open") == 0, 5, "closed")
    finally:
        assert s.stop() == 0


def test_sighup_with_new_relay_networks_changes_the_next_decision(
    tmp_path: Path, pem: bytes
) -> None:
    s = make(tmp_path, pem).start()
    try:
        assert s.send(MESSAGE, OTHER).stage == "connect"
        s.write_config({**s.config, "relay_networks": [RELAY + "/32", OTHER + "/32"]})
        s.reload()
        assert len(s.send(MESSAGE, OTHER).signatures) == 1
        assert s.metric("dkim_sidecar_config_reloads_total", result="ok") == 1
        assert s.metric("dkim_sidecar_config_last_reload_success_timestamp_seconds") > 0
        # and back: the network is gone again for the next connection
        s.write_config({**s.config, "relay_networks": [RELAY + "/32"]})
        s.reload()
        assert s.send(MESSAGE, OTHER).stage == "connect"
    finally:
        assert s.stop() == 0


def test_sighup_with_broken_file_keeps_old_config_and_counts_failure(
    tmp_path: Path, pem: bytes
) -> None:
    s = make(tmp_path, pem).start()
    try:
        s.config_path.write_text("relay_networks: [10.0.0.0/33]\nbogus_key: 1\n")
        s.reload()
        assert s.metric("dkim_sidecar_config_reloads_total", result="failed") == 1
        log = s.log()
        assert "reload failed, keeping the running config" in log
        assert "10.0.0.0/33" in log and "bogus_key" in log
        assert len(s.send(MESSAGE, RELAY).signatures) == 1  # old behaviour intact
        assert s.send(MESSAGE, OTHER).stage == "connect"
    finally:
        assert s.stop() == 0


def test_listen_change_needs_a_restart_and_says_so(tmp_path: Path, pem: bytes) -> None:
    s = make(tmp_path, pem).start()
    try:
        s.write_config({**s.config, "listen": "inet:127.0.0.1:1"})
        s.reload()
        assert "needs a restart" in s.log() and "setting=listen" in s.log()
        assert len(s.send(MESSAGE, RELAY).signatures) == 1  # still on the old address
    finally:
        assert s.stop() == 0


def test_readyz_follows_key_state(tmp_path: Path, pem: bytes) -> None:
    (tmp_path / "keys").mkdir()
    s = Sidecar(
        tmp_path,
        {
            "relay_networks": [RELAY + "/32"],
            "keys": {"directory": str(tmp_path / "keys"), "refresh_interval": 0.5},
        },
    ).start(wait_ready=False)
    try:
        wait_for(lambda: "keys loaded" in s.log() or "key source" in s.log(), 5, "first load")
        status, text = s.http("/readyz")
        assert status == 503 and "no usable keys" in text
        assert s.send(MESSAGE, RELAY).signatures == []  # mail passes, unsigned
        write_keys(tmp_path / "keys", [("example.com", "s1", pem)])
        wait_for(lambda: s.http("/readyz")[0] == 200, 5, "ready after the refresh")
        assert len(s.send(MESSAGE, RELAY).signatures) == 1
    finally:
        assert s.stop() == 0


def test_sigterm_during_a_message_lets_it_finish(tmp_path: Path, pem: bytes) -> None:
    s = make(tmp_path, pem).start()
    c = s.client()
    assert c.connect(RELAY) == "continue"
    assert c.mail(b"a@example.com", {"i": "Q1"}) == "continue"
    c.header(b"From", b" <a@example.com>")
    assert c.eoh({"i": "Q1"}) == "continue"
    assert c.body(b"first half\r\n") == "continue"
    s.signal(signal.SIGTERM)
    s.wait_log("stopping")
    time.sleep(0.3)
    assert s.proc is not None and s.proc.poll() is None  # still finishing our message
    assert c.body(b"second half\r\n") == "continue"
    action, result = c.eom({"i": "Q1"})
    assert action == "accept" and len(result.signatures) == 1
    c.close()
    assert s.proc.wait(10) == 0
    assert "unfinished_messages=0" in s.log()


def test_sigterm_stops_quickly_when_idle(tmp_path: Path, pem: bytes) -> None:
    s = make(tmp_path, pem).start()
    t0 = time.monotonic()
    assert s.stop() == 0
    assert time.monotonic() - t0 < 3


def test_json_logs_one_line_per_message(tmp_path: Path, pem: bytes) -> None:
    s = make(tmp_path, pem, log_format="json").start()
    try:
        with s.client() as c:
            c.connect(RELAY)
            c.send_message(MESSAGE, queue_id="JSONQ1")
        s.wait_log("JSONQ1")
        lines = [json.loads(x) for x in s.log().splitlines() if x.startswith("{")]
        mine = [x for x in lines if x.get("queue_id") == "JSONQ1"]
        assert len(mine) == 1
        assert mine[0]["reason"] == "signed" and mine[0]["domain"] == "example.com"
        assert mine[0]["client"] == RELAY and mine[0]["selectors"] == "s1"
    finally:
        assert s.stop() == 0


def test_reload_under_traffic_never_errors(tmp_path: Path, pem: bytes) -> None:
    s = make(tmp_path, pem).start()
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            r = s.send(MESSAGE, RELAY)
            if len(r.signatures) != 1:
                errors.append(f"{r.action} at {r.stage}")

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            s.reload()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == []
    assert s.metric("dkim_sidecar_messages_total", outcome="error", reason="error") == 0
    assert s.stop() == 0


def test_reload_of_an_empty_file_keeps_the_running_config(tmp_path: Path, pem: bytes) -> None:
    s = make(tmp_path, pem).start()
    try:
        s.config_path.write_text("")  # as seen mid-write by a non-atomic editor
        s.reload()
        assert "the file is empty" in s.log()
        assert s.metric("dkim_sidecar_config_reloads_total", result="failed") == 1
        assert len(s.send(MESSAGE, RELAY).signatures) == 1
    finally:
        assert s.stop() == 0


def test_unix_socket_serves_and_is_cleaned_up(tmp_path: Path, pem: bytes) -> None:
    """`listen: unix:/path`: a stale socket file from a killed run is replaced, the socket is
    for its owner and group only (whoever can connect can ask for signatures), and it is gone
    after a clean stop."""
    path = tmp_path / "milter.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # what a killed run leaves behind: a socket nobody listens on
    s = make(tmp_path, pem, listen=f"unix:{path}").start()
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        r = s.send(MESSAGE, RELAY)
        dns = dns_table([SigningKey.load("example.com", "s1", pem)])
        assert verify_all(r.message, dns) == [True]
        assert not s.send(MESSAGE, OTHER).signatures
    finally:
        assert s.stop() == 0
    assert not path.exists()


def test_unix_listen_path_that_is_a_file_is_left_alone(tmp_path: Path, pem: bytes) -> None:
    """A typo in `listen` (a path to some file) must not delete that file: the sidecar says
    it cannot listen and stops."""
    path = tmp_path / "main.cf"
    path.write_text("myhostname = mx.example.com\n")
    s = make(tmp_path, pem, listen=f"unix:{path}")
    with pytest.raises(RuntimeError, match="exited with 1"):
        s.start()
    assert "cannot listen" in s.log()
    assert path.read_text() == "myhostname = mx.example.com\n"


def test_per_domain_labels_name_signing_domains_only(tmp_path: Path, pem: bytes) -> None:
    """metrics.per_domain_labels: a label per signing domain (ours, from the key sources); the
    From domain of a message we have no key for is the client's to choose, and never becomes
    a label value."""
    s = make(tmp_path, pem)
    s.config["metrics"]["per_domain_labels"] = True
    s.write_config()
    s.start()
    try:
        assert len(s.send(MESSAGE, RELAY).signatures) == 1
        stranger = MESSAGE.replace(b"a@example.com", b"a@stranger.example")
        assert not s.send(stranger, RELAY).signatures
        assert s.metric("dkim_sidecar_messages_total", outcome="skipped", reason="no_key") == 1
        assert (
            s.metric("dkim_sidecar_domain_messages_total", domain="example.com", outcome="signed")
            == 1
        )
        assert "stranger.example" not in s.http("/metrics")[1]
    finally:
        assert s.stop() == 0
