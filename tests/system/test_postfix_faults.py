"""Faults around us, through a real Postfix: the sidecar killed (SIGKILL) and restarted while
mail flows. With `default_action=accept` no message may be lost or duplicated; signing resumes."""

from __future__ import annotations

import re
import threading
import time
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
    total = 60
    sent: list[int] = []
    failures: list[str] = []

    def send_all() -> None:
        for i in range(total):
            msg = (
                f"From: <a@example.com>\r\nTo: <b@example.net>\r\nSubject: n{i}\r\n\r\n"
                f"message {i}\r\n"
            ).encode()
            r = pf.send("a@example.com", ["b@example.net"], msg, xclient={"ADDR": RELAY})
            if r.ok:
                sent.append(i)
            else:
                failures.append(f"{i}: {r.code} {r.message!r} at {r.stage}")
            time.sleep(0.02)

    t = threading.Thread(target=send_all)
    t.start()
    wait_for(lambda: len(sent) >= 15, 60, "the first messages")
    s.kill()  # SIGKILL: no goodbye to Postfix
    wait_for(lambda: len(sent) >= 30, 60, "messages while the sidecar is down")
    s.start()
    t.join(120)
    assert not t.is_alive()
    assert failures == []
    got = pf.sink.wait_for(total, timeout=60)
    time.sleep(0.5)
    assert len(pf.sink.messages) == total  # none duplicated
    subjects = sorted(int(re.search(rb"Subject: n(\d+)", m.data).group(1)) for m in got)
    assert subjects == list(range(total))  # none lost
    by_n = {int(re.search(rb"Subject: n(\d+)", m.data).group(1)): m.data for m in got}
    signed = [n for n, data in by_n.items() if signature_domains(data)]
    for n in signed:
        assert verify_all(by_n[n], dns) == [True]
    assert any(n < 15 for n in signed)  # before the kill
    assert any(n >= 45 for n in signed)  # after the restart: signing resumed
    assert len(signed) < total  # some went out unsigned while it was down
    assert s.stop() == 0
