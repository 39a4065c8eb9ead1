"""Soak: 100,000 messages through the real milter at a steady rate (`make soak`, not `make test`).

Several client threads, each pacing itself, send a realistic mix (mostly small messages, some
larger ones, some from outside clients, some aborted, several messages per connection); the
sidecar's RSS, threads and open fds are sampled every 10 s. After the warm-up they must stay
flat, and nothing may end in an error. SOAK_MESSAGES and SOAK_RATE (messages/s) override the
defaults for a shorter or harder run.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from test_robustness import (
    MESSAGES,
    OUTSIDE,
    RELAY,
    Process,
    dns_of,
    msg,
    settle,
    start_sidecar,
    verify,
)

from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from harness.sidecar import Sidecar

pytestmark = pytest.mark.soak

TOTAL = int(os.environ.get("SOAK_MESSAGES", "100000"))
RATE = float(os.environ.get("SOAK_RATE", "500"))  # messages per second, all threads together
THREADS = 4
SAMPLE_EVERY = 10.0  # seconds
WARM_UP = 20.0  # seconds of traffic before the baseline sample


@pytest.fixture(scope="module")
def keys() -> list[SigningKey]:
    # what a deployment would use: RSA-2048 and Ed25519, dual signatures
    return [
        SigningKey.load("example.com", "rsa", generate_key(Algorithm.RSA_SHA256, 2048)),
        SigningKey.load("example.com", "ed", generate_key(Algorithm.ED25519_SHA256)),
    ]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, keys: list[SigningKey]):
    s = start_sidecar(tmp_path_factory.mktemp("soak"), keys)
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log()


def _body(n: int) -> bytes:
    if n % 50 == 0:  # one in 50: ~100 KB, several body chunks
        return b"".join(
            b"line %06d of a larger message, some text to fill it\r\n" % i for i in range(1800)
        )
    return b"Message %d.\r\n\r\nSome text,  with  spaces \r\nand lines.\r\n" % n


def test_soak_100k_messages_stay_flat(sidecar: Sidecar, keys: list[SigningKey]) -> None:
    assert sidecar.proc is not None
    proc = Process(sidecar.proc.pid)
    dns = dns_of(keys)
    per_thread = TOTAL // THREADS
    interval = THREADS / RATE  # each thread's pace
    sent = [0] * THREADS
    signed_seen = [0] * THREADS
    bad: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()
    samples: list[tuple[float, int, float, int, int]] = []  # (t, msgs, rss MB, threads, fds)
    t0 = time.monotonic()

    def client(n: int) -> None:
        try:
            i = 0
            next_at = time.monotonic()
            while i < per_thread:
                outside = i % 97 == 0  # now and then an inbound Internet client
                with sidecar.client() as c:
                    first = c.connect(OUTSIDE if outside else RELAY)
                    for _ in range(1 + i % 7):  # 1..7 messages on one connection
                        if i >= per_thread:
                            break
                        delay = next_at - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                        next_at += interval
                        number = n * per_thread + i
                        i += 1
                        sent[n] += 1
                        if first != "continue":
                            break  # let go at connect: the MTA sends nothing more
                        if number % 101 == 0:  # an aborted one (RSET mid-body)
                            c.mail(b"a@example.com")
                            c.header(b"From", b" <a@example.com>")
                            c.eoh()
                            c.body(b"half\r\n")
                            c.abort()
                            continue
                        r = c.send_message(msg(body=_body(number)), queue_id=f"S{number}")
                        if len(r.signatures) != 2:
                            bad.append(f"message {number}: {r.action} at {r.stage}")
                            continue
                        signed_seen[n] += 1
                        if number % 997 == 0 and verify(r.message, dns) != [True, True]:
                            bad.append(f"message {number}: signature does not verify")
        except BaseException as exc:  # carried to the test
            errors.append(exc)

    def sampler() -> None:
        while not done.wait(SAMPLE_EVERY):
            samples.append((time.monotonic() - t0, sum(sent), proc.rss_mb, proc.threads, proc.fds))

    start = (proc.rss_mb, proc.threads, proc.fds)
    signed_before = sidecar.metric(MESSAGES, outcome="signed", reason="signed")
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(THREADS)]
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    for t in threads:
        t.start()
    budget = TOTAL / RATE * 3 + 120
    for t in threads:
        t.join(max(0.0, t0 + budget - time.monotonic()))
    elapsed = time.monotonic() - t0
    done.set()
    watcher.join(5)
    assert not any(t.is_alive() for t in threads), f"clients still running after {budget:.0f}s"
    assert not errors, errors[0]
    assert not bad, bad[:10]

    assert settle(lambda: sidecar.metric("dkim_sidecar_milter_connections_open") == 0)
    end = (proc.rss_mb, proc.threads, proc.fds)
    total = sum(sent)
    rows = "\n".join(
        f"  {t:6.0f}s {m:7d} msgs  RSS {rss:6.1f} MB  threads {th:3d}  fds {fd:3d}"
        for t, m, rss, th, fd in samples
    )
    print(
        f"\nsoak: {total} messages in {elapsed:.0f}s = {total / elapsed:.0f} msgs/s "
        f"(target {RATE:.0f}), {sum(signed_seen)} signed\n"
        f"  RSS {start[0]:.1f} -> {end[0]:.1f} MB, threads {start[1]} -> {end[1]}, "
        f"fds {start[2]} -> {end[2]}\n{rows}"
    )

    assert total == THREADS * per_thread
    assert sidecar.metric(MESSAGES, outcome="error", reason="error") == 0
    assert sidecar.metric(MESSAGES, outcome="signed", reason="signed") - signed_before == sum(
        signed_seen
    )
    warm = [s for s in samples if s[0] >= WARM_UP]
    assert len(warm) >= 2, "too short a run to judge flatness"
    base_rss, base_threads, base_fds = warm[0][2], warm[0][3], warm[0][4]
    assert max(s[2] for s in warm) - base_rss < 10, "RSS kept growing after the warm-up"
    assert end[0] - base_rss < 10
    # at most one connection per client thread open at a sample, plus the scrape itself
    assert max(s[3] for s in warm) <= base_threads + THREADS + 1
    assert max(s[4] for s in warm) <= base_fds + THREADS + 1
    assert end[1] <= start[1] + 1 and end[2] <= start[2] + 1
