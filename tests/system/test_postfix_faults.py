"""Faults around us, through a real Postfix: the sidecar killed (SIGKILL) and restarted while
mail flows. With `default_action=accept` no message may be lost or duplicated; signing resumes."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from harness.dkimcheck import signature_domains, verify_all
from harness.sidecar import Sidecar, wait_for, write_keys

RELAY = "192.0.2.9"


def test_sigkill_and_restart_while_postfix_sends_loses_nothing(
    postfix_factory, tmp_path: Path
) -> None:
    pem = generate_key(Algorithm.RSA_SHA256, 1024)
    write_keys(tmp_path / "keys", [("example.com", "s1", pem)])
    key = SigningKey.load("example.com", "s1", pem)
    dns = {key.dns_name: key.dns_record()}
    s = Sidecar(
        tmp_path,
        {"relay_networks": ["192.0.2.0/24"], "keys": {"directory": str(tmp_path / "keys")}},
    )
    s.start()
    pf = postfix_factory(
        f"{{ {s.postfix_milter}, default_action=accept, connect_timeout=2s }}",
        extra_mynetworks=[f"{RELAY}/32"],
    )
    done: list[int] = []  # the numbers of the messages Postfix accepted, in order
    failures: list[str] = []
    # The sender runs while `go` is set. The test clears it to pause the sender, and then waits
    # for `idle`, which the sender sets once it is between two messages. Which message was sent
    # in which state of the sidecar then follows from the order of events, not from speed.
    go, idle, stop = threading.Event(), threading.Event(), threading.Event()
    go.set()

    def sender() -> None:
        i = 0
        while not stop.is_set():
            if not go.is_set():
                idle.set()
                go.wait()
                continue
            msg = (
                f"From: <a@example.com>\r\nTo: <b@example.net>\r\nSubject: n{i}\r\n\r\n"
                f"message {i}\r\n"
            ).encode()
            r = pf.send("a@example.com", ["b@example.net"], msg, xclient={"ADDR": RELAY})
            if r.ok:
                done.append(i)
            else:
                failures.append(f"{i}: {r.code} {r.message!r} at {r.stage}")
            i += 1

    def sent() -> int:
        return len(done) + len(failures)

    def resume() -> None:
        idle.clear()
        go.set()

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    try:
        wait_for(lambda: sent() >= 10, 120, "the first messages")
        # Killed while mail flows: the message in flight may be signed or not.
        before_kill = sent()  # 0 .. before_kill-1 were done before the kill: signed
        s.kill()  # SIGKILL: no goodbye to Postfix
        dead = sent() + 1  # dead .. were sent after the process was gone: unsigned
        wait_for(lambda: sent() >= dead + 10, 120, "messages while the sidecar is down")
        go.clear()
        assert idle.wait(120), "the sender did not pause"
        s.start()  # waits for /readyz, however long that takes on this machine
        restarted = sent()  # restarted .. were sent to the new process: signed
        resume()
        wait_for(lambda: sent() >= restarted + 10, 120, "messages after the restart")
    finally:
        stop.set()
        go.set()
        t.join(120)
    assert not t.is_alive()
    assert failures == []
    total = len(done)
    pf.sink.wait_for(total, timeout=120)
    # Once the queue is empty, nothing more can arrive: what the sink holds is final.
    pf.wait_queue_empty(timeout=120)
    by_n: dict[int, bytes] = {}
    for m in pf.sink.messages:
        n = int(re.search(rb"Subject: n(\d+)", m.data).group(1))
        assert n not in by_n, f"message {n} arrived twice"
        by_n[n] = m.data
    assert sorted(by_n) == list(range(total)), "a message was lost"
    for n, data in sorted(by_n.items()):
        if n < before_kill or n >= restarted:
            assert verify_all(data, dns) == [True], f"message {n} (sidecar up)"
        elif n >= dead:
            assert signature_domains(data) == [], f"message {n} (sidecar down)"
        else:  # in flight at the kill: either way, but a signature must be good
            assert verify_all(data, dns) in ([], [True]), f"message {n} (at the kill)"
    assert s.stop() == 0
