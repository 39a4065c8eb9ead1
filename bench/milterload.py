"""A milter-protocol load client: P processes x T threads, each thread driving its own
milter connections with dkim_sidecar.milter.client.MilterClient, byte-exactly as Postfix would.

By default every message gets a connection of its own (negotiate, connect, MAIL ... end of
message, QUIT), as Postfix's smtpd opens one milter connection per SMTP session and
`smtp-source` sends one message per session. Several processes, so the client's GIL is not
what limits the milter; each process reports its own CPU time.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dkim_sidecar.milter.client import CHUNK, MilterClient, split_header


@dataclass
class LoadResult:
    messages: int
    signed: int
    errors: int
    elapsed: float  # wall seconds, first message sent to last reply read
    client_cpu: float  # CPU seconds of all client processes, while sending
    latencies: list[float] = field(default_factory=list)  # seconds per message
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed if self.elapsed > 0 else 0.0


def one_connection(
    address: str,
    client_ip: str,
    fields: list[tuple[bytes, bytes]],
    body: bytes,
    queue_ids: list[str],
) -> int:
    """One connection and its messages (as Postfix's smtpd: negotiate, connect, then per
    message MAIL ... end of message); how many came back with a DKIM-Signature."""
    signed = 0
    with MilterClient(address, timeout=60) as c:
        c.negotiate()
        if c.connect(client_ip) != "continue":
            c.quit()
            return 0
        for queue_id in queue_ids:
            signed += _message(c, fields, body, queue_id)
        c.quit()
    return signed


def _message(c: MilterClient, fields: list[tuple[bytes, bytes]], body: bytes, qid: str) -> bool:
    macros = {"i": qid}
    if c.mail(b"bench@example.com", macros) != "continue":
        return False
    c.rcpt(b"rcpt@example.net")
    c.data()
    for name, value in fields:
        c.header(name, value)
    if c.eoh(macros) != "continue":
        return False
    for i in range(0, len(body), CHUNK):
        if c.body(body[i : i + CHUNK]) != "continue":
            return False
    _, result = c.eom(macros)
    return any(n.lower() == b"dkim-signature" for _, n, _ in result.inserted)


def _worker(
    address: str,
    client_ip: str,
    message: bytes,
    count: int,
    threads: int,
    per_connection: int,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    fields, body = split_header(message)
    lock = threading.Lock()
    left = [count]
    out: dict[str, Any] = {"signed": 0, "errors": 0, "lat": [], "err": ""}

    def loop(n: int) -> None:
        seq = 0
        while True:
            with lock:
                k = min(per_connection, left[0])
                if k <= 0:
                    return
                left[0] -= k
            qids = [f"B{n:02d}{seq + i:06X}" for i in range(k)]
            seq += k
            t0 = time.monotonic()
            try:
                ok = one_connection(address, client_ip, fields, body, qids)
            except Exception as exc:
                with lock:
                    out["errors"] += k
                    out["err"] = out["err"] or f"{type(exc).__name__}: {exc}"
                continue
            dt = (time.monotonic() - t0) / k
            with lock:
                out["lat"].extend([dt] * k)
                out["signed"] += ok

    pool = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    ready.release()
    go.wait(60)
    cpu0, t0 = time.process_time(), time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join(600)
    t1, cpu1 = time.monotonic(), time.process_time()
    results.put((count, out["signed"], out["errors"], t0, t1, cpu1 - cpu0, out["lat"], out["err"]))


def run_load(
    address: str,
    message: bytes,
    count: int,
    concurrency: int,
    client_ip: str,
    processes: int | None = None,
    per_connection: int = 1,
    before_go: Any = None,
) -> LoadResult:
    """Send `count` copies of `message` over `concurrency` parallel connections, each
    connection carrying `per_connection` messages.

    `before_go` is called once every client process is ready and just before they start
    (the caller reads the milter's CPU counters there)."""
    procs = processes or min(concurrency, 4)
    procs = max(1, min(procs, concurrency))
    ctx = mp.get_context("spawn")
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    results = ctx.Queue()
    workers = []
    for p in range(procs):
        threads = concurrency // procs + (1 if p < concurrency % procs else 0)
        share = count // procs + (1 if p < count % procs else 0)
        w = ctx.Process(
            target=_worker,
            args=(address, client_ip, message, share, threads, per_connection, ready, go, results),
            daemon=True,
        )
        w.start()
        workers.append(w)
    try:
        for _ in workers:
            if not ready.acquire(timeout=60):
                raise TimeoutError("a load client process did not start")
        if before_go is not None:
            before_go()
        go.set()
        parts = [results.get(timeout=900) for _ in workers]
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
                w.join(5)
    lat: list[float] = []
    for part in parts:
        lat.extend(part[6])
    return LoadResult(
        messages=sum(p[0] for p in parts) - sum(p[2] for p in parts),
        signed=sum(p[1] for p in parts),
        errors=sum(p[2] for p in parts),
        elapsed=max(p[4] for p in parts) - min(p[3] for p in parts),
        client_cpu=sum(p[5] for p in parts),
        latencies=lat,
        first_error=next((p[7] for p in parts if p[7]), ""),
    )
