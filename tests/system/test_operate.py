"""Operating the sidecar: a real process, real signals, real HTTP."""

from __future__ import annotations

import errno
import json
import signal
import socket
import stat
import threading
from pathlib import Path

import pytest

from dkim_sidecar import __version__
from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from dkim_sidecar.milter.client import P_HDR_LEADSPC, MilterClient, apply_changes
from dkim_sidecar.service import STOP_GRACE
from harness.dkimcheck import verify_all
from harness.procfs import socket_nodelay
from harness.sidecar import Sidecar, dns_table, wait_for, write_keys
from harness.skips import machine_cannot
from harness.threads import run_threads

RELAY = "192.0.2.10"
OTHER = "198.51.100.20"

MESSAGE = b"From: <a@example.com>\r\nTo: <b@example.net>\r\nSubject: ops\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def pem() -> bytes:
    return generate_key(Algorithm.RSA_SHA256, 1024)


@pytest.fixture(scope="module")
def dns(pem: bytes) -> dict[str, str]:
    return dns_table([SigningKey.load("example.com", "s1", pem)])


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
                    machine_cannot(f"pidfd_getfd: {exc.strerror}")
                raise
            assert found == [("established", True)]
    finally:
        s.stop()


def test_metrics_move_with_messages_and_health_endpoints_answer(
    tmp_path: Path, pem: bytes, dns: dict[str, str]
) -> None:
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
        for _ in range(3):
            assert verify_all(s.send(MESSAGE, RELAY).message, dns) == [True]
        assert s.send(MESSAGE, OTHER).stage == "connect"
        assert s.metric("dkim_sidecar_messages_total", outcome="signed", reason="signed") == 3
        assert s.metric("dkim_sidecar_messages_total", outcome="skipped", reason="not_relay") == 1
        assert s.metric("dkim_sidecar_signatures_total", algorithm="rsa-sha256") == 3
        assert s.metric("dkim_sidecar_sign_duration_seconds_count") == 3
        assert s.metric("dkim_sidecar_message_size_bytes_count") == 3
        wait_for(lambda: s.metric("dkim_sidecar_milter_connections_open") == 0, 30, "closed")
    finally:
        assert s.stop() == 0


def test_metric_raises_on_a_name_not_exported_and_on_a_dead_endpoint(
    tmp_path: Path, pem: bytes
) -> None:
    """The tests' `s.metric(...) == 0` checks: Sidecar.metric reads 0 only for a sample of a
    family the process exports, never for a typo or an endpoint that does not answer."""
    s = make(tmp_path, pem).start()
    try:
        signed = {"outcome": "signed", "reason": "signed"}
        assert s.metric("dkim_sidecar_messages_total", **signed) == 0  # exported, not yet counted
        with pytest.raises(LookupError, match="no metric"):
            s.metric("dkim_sidecar_message_total", **signed)
        with pytest.raises(LookupError, match="labels"):
            s.metric("dkim_sidecar_signatures_total", algo="rsa-sha256")
        # before any message, so the family has no sample to compare with: still refused
        with pytest.raises(LookupError):
            s.metric("dkim_sidecar_messages_total", outcome="signed", reasn="signed")
        with pytest.raises(LookupError):
            s.metric("dkim_sidecar_messages_total", outcome="signed", reason="sigend")
    finally:
        assert s.stop() == 0
    with pytest.raises(RuntimeError, match="answered nothing"):
        s.metric("dkim_sidecar_messages_total", **signed)


def test_sidecar_sees_only_the_environment_the_test_gives(
    tmp_path: Path, pem: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's REDISPASS, proxies or DKIM_SIDECAR_* overrides do not reach the process, and
    the harness's HTTP checks go straight to 127.0.0.1 whatever http_proxy says."""
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("REDISPASS", "from-the-host")
    monkeypatch.setenv("DKIM_SIDECAR_LOG_LEVEL", "debug")
    write_keys(tmp_path / "keys", [("example.com", "s1", pem)])
    s = Sidecar(
        tmp_path,
        {"relay_networks": [RELAY + "/32"], "keys": {"directory": str(tmp_path / "keys")}},
        env={"VALKEYPASS": "given"},
    ).start()
    try:
        assert s.proc is not None
        environ = Path(f"/proc/{s.proc.pid}/environ").read_bytes().split(b"\0")
        names = {e.partition(b"=")[0].decode() for e in environ if e}
        assert names == {"PATH", "LANG", "PYTHONUNBUFFERED", "VALKEYPASS"}
        assert s.http("/healthz") == (200, "ok\n")
    finally:
        assert s.stop() == 0


def test_sighup_with_new_relay_networks_changes_the_next_decision(
    tmp_path: Path, pem: bytes, dns: dict[str, str]
) -> None:
    s = make(tmp_path, pem).start()
    try:
        assert s.send(MESSAGE, OTHER).stage == "connect"
        s.write_config({**s.config, "relay_networks": [RELAY + "/32", OTHER + "/32"]})
        s.reload()
        assert verify_all(s.send(MESSAGE, OTHER).message, dns) == [True]
        assert s.metric("dkim_sidecar_config_reloads_total", result="ok") == 1
        assert s.metric("dkim_sidecar_config_last_reload_success_timestamp_seconds") > 0
        # and back: the network is gone again for the next connection
        s.write_config({**s.config, "relay_networks": [RELAY + "/32"]})
        s.reload()
        assert s.send(MESSAGE, OTHER).stage == "connect"
    finally:
        assert s.stop() == 0


def test_sighup_with_broken_file_keeps_old_config_and_counts_failure(
    tmp_path: Path, pem: bytes, dns: dict[str, str]
) -> None:
    s = make(tmp_path, pem).start()
    try:
        s.config_path.write_text("relay_networks: [10.0.0.0/33]\nbogus_key: 1\n")
        s.reload()
        assert s.metric("dkim_sidecar_config_reloads_total", result="failed") == 1
        log = s.log()
        assert "reload failed, keeping the running config" in log
        assert "10.0.0.0/33" in log and "bogus_key" in log
        assert verify_all(s.send(MESSAGE, RELAY).message, dns) == [True]  # old behaviour intact
        assert s.send(MESSAGE, OTHER).stage == "connect"
    finally:
        assert s.stop() == 0


def test_listen_change_needs_a_restart_and_says_so(
    tmp_path: Path, pem: bytes, dns: dict[str, str]
) -> None:
    s = make(tmp_path, pem).start()
    try:
        s.write_config({**s.config, "listen": "inet:127.0.0.1:1"})
        s.reload()
        assert "needs a restart" in s.log() and "setting=listen" in s.log()
        assert verify_all(s.send(MESSAGE, RELAY).message, dns) == [True]  # still on the old address
    finally:
        assert s.stop() == 0


def test_readyz_follows_key_state(tmp_path: Path, pem: bytes, dns: dict[str, str]) -> None:
    (tmp_path / "keys").mkdir()
    s = Sidecar(
        tmp_path,
        {
            "relay_networks": [RELAY + "/32"],
            "keys": {"directory": str(tmp_path / "keys"), "refresh_interval": 0.5},
        },
    ).start(wait_ready=False)
    try:
        wait_for(lambda: "keys loaded" in s.log() or "key source" in s.log(), 30, "first load")
        status, text = s.http("/readyz")
        assert status == 503 and "no usable keys" in text
        # mail passes, unsigned: accepted at the end of the message, for want of a key
        r = s.send(MESSAGE, RELAY)
        assert (r.action, r.stage, r.signatures) == ("accept", "eom", [])
        assert s.metric("dkim_sidecar_messages_total", outcome="skipped", reason="no_key") == 1
        write_keys(tmp_path / "keys", [("example.com", "s1", pem)])
        wait_for(lambda: s.http("/readyz")[0] == 200, 30, "ready after the refresh")
        assert verify_all(s.send(MESSAGE, RELAY).message, dns) == [True]
    finally:
        assert s.stop() == 0


def test_sigterm_during_a_message_lets_it_finish(
    tmp_path: Path, pem: bytes, dns: dict[str, str]
) -> None:
    s = make(tmp_path, pem).start()
    c = s.client()
    assert c.connect(RELAY) == "continue"
    assert c.mail(b"a@example.com", {"i": "Q1"}) == "continue"
    c.header(b"From", b" <a@example.com>")
    assert c.eoh({"i": "Q1"}) == "continue"
    assert c.body(b"first half\r\n") == "continue"
    s.signal(signal.SIGTERM)
    s.wait_log("stopping")
    # the stop is under way (new connections are let go at connect) and our message holds it
    wait_for(lambda: s.send(MESSAGE, RELAY).stage == "connect", 30, "draining")
    assert s.proc is not None and s.proc.poll() is None
    assert c.body(b"second half\r\n") == "continue"
    action, result = c.eom({"i": "Q1"})
    assert action == "accept"
    sent = b"From: <a@example.com>\r\n\r\nfirst half\r\nsecond half\r\n"
    signed = apply_changes(sent, result, bool(c.protocol & P_HDR_LEADSPC))
    assert verify_all(signed, dns) == [True]
    c.close()
    assert s.proc.wait(30) == 0
    assert "unfinished_messages=0" in s.log()


def test_sigterm_does_not_wait_out_the_grace_when_idle(
    tmp_path: Path, pem: bytes, dns: dict[str, str]
) -> None:
    """Messages in progress at SIGTERM get STOP_GRACE seconds; with none (an MTA connection
    open between messages, as Postfix keeps them), the process exits well before that. Sidecar.stop
    kills what is still running at its timeout, which then shows as a return code of -9."""
    s = make(tmp_path, pem).start()
    with s.client() as c:
        assert c.connect(RELAY) == "continue"
        assert verify_all(c.send_message(MESSAGE).message, dns) == [True]
        assert s.stop(timeout=STOP_GRACE / 2) == 0
    assert "unfinished_messages=0" in s.log()


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


def test_reload_under_traffic_never_errors(tmp_path: Path, pem: bytes, dns: dict[str, str]) -> None:
    """Ten reloads while three clients send without pause: every message is signed and the
    signature verifies. Each reload waits for more messages to be done, so they overlap."""
    s = make(tmp_path, pem).start()
    stop = threading.Event()
    done: list[int] = []  # one entry per verified message (list.append is atomic)

    def client(i: int) -> None:
        if i == 0:
            try:
                for _ in range(10):
                    before = len(done)
                    s.reload()
                    wait_for(lambda n=before: len(done) > n + 3, 60, "messages after the reload")
            finally:
                stop.set()
            return
        while not stop.is_set():
            r = s.send(MESSAGE, RELAY)
            assert verify_all(r.message, dns) == [True], f"{r.action} at {r.stage}"
            done.append(i)

    try:
        run_threads(4, client, timeout=600)
        assert set(done) == {1, 2, 3}
        assert s.metric("dkim_sidecar_messages_total", outcome="error", reason="error") == 0
    finally:
        assert s.stop() == 0


def test_reload_of_an_empty_file_keeps_the_running_config(
    tmp_path: Path, pem: bytes, dns: dict[str, str]
) -> None:
    s = make(tmp_path, pem).start()
    try:
        s.config_path.write_text("")  # as seen mid-write by a non-atomic editor
        s.reload()
        assert "the file is empty" in s.log()
        assert s.metric("dkim_sidecar_config_reloads_total", result="failed") == 1
        assert verify_all(s.send(MESSAGE, RELAY).message, dns) == [True]
    finally:
        assert s.stop() == 0


def test_unix_socket_serves_and_is_cleaned_up(
    tmp_path: Path, pem: bytes, dns: dict[str, str]
) -> None:
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
        assert verify_all(s.send(MESSAGE, RELAY).message, dns) == [True]
        r = s.send(MESSAGE, OTHER)
        assert (r.action, r.stage, r.signatures) == ("accept", "connect", [])
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


def test_per_domain_labels_name_signing_domains_only(
    tmp_path: Path, pem: bytes, dns: dict[str, str]
) -> None:
    """metrics.per_domain_labels: a label per signing domain (ours, from the key sources); the
    From domain of a message we have no key for is the client's to choose, and never becomes
    a label value."""
    s = make(tmp_path, pem)
    s.config["metrics"]["per_domain_labels"] = True
    s.write_config()
    s.start()
    try:
        assert verify_all(s.send(MESSAGE, RELAY).message, dns) == [True]
        stranger = MESSAGE.replace(b"a@example.com", b"a@stranger.example")
        r = s.send(stranger, RELAY)
        assert (r.action, r.stage, r.signatures) == ("accept", "eom", [])
        assert s.metric("dkim_sidecar_messages_total", outcome="skipped", reason="no_key") == 1
        assert (
            s.metric("dkim_sidecar_domain_messages_total", domain="example.com", outcome="signed")
            == 1
        )
        assert "stranger.example" not in s.http("/metrics")[1]
    finally:
        assert s.stop() == 0
