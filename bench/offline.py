"""Offline signing in this process: our MessageSigner against dkimpy's `dkim.sign`, on the same
message and key, and the two limits (one RSA-2048 signature, SHA-256 over the body)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import dkim

from common import DOMAIN, SELECTOR, make_message
from dkim_sidecar.config import Config
from dkim_sidecar.dkim.header import split_message
from dkim_sidecar.dkim.keys import SigningKey
from dkim_sidecar.dkim.signer import MessageSigner
from dkim_sidecar.runtime import policy_of


def per_second(fn: Callable[[], object], seconds: float, min_runs: int = 3) -> float:
    """Calls per CPU second of this process (CPU, not wall: other work on the machine does
    not count against it)."""
    # warm up for a while, not once: the first calls of a process pay for allocator arenas,
    # caches and the CPU's clock ramping up; the same for every signer measured
    t0 = time.monotonic()
    while True:
        fn()
        if time.monotonic() - t0 >= min(0.25, seconds / 4):
            break
    runs = 0
    c0 = time.process_time()
    t0 = time.monotonic()
    while runs < min_runs or time.monotonic() - t0 < seconds:
        fn()
        runs += 1
    return runs / max(time.process_time() - c0, 1e-9)


def signers(pem: bytes) -> dict[str, Callable[[bytes], object]]:
    key = SigningKey.load(DOMAIN, SELECTOR, pem)
    policy = policy_of(Config())  # the defaults: relaxed/relaxed, the default h= list

    def ours(message: bytes) -> object:
        fields, body = split_message(message)
        signer = MessageSigner([key], policy, int(time.time()))
        signer.update(body)
        return signer.sign(fields)

    def dkimpy(message: bytes) -> object:
        return dkim.sign(
            message,
            SELECTOR.encode(),
            DOMAIN.encode(),
            pem,
            canonicalize=(b"relaxed", b"relaxed"),
        )

    return {"sidecar": ours, "dkimpy": dkimpy}


def limits(pem: bytes, seconds: float) -> dict[str, float]:
    """The floor under any signer: one RSA-2048 signature (ms) and SHA-256 (MB/s)."""
    key = SigningKey.load(DOMAIN, SELECTOR, pem)
    digest = hashlib.sha256(b"x").digest()
    rsa = per_second(lambda: key.sign_digest(digest), seconds)
    data = b"x" * (1 << 20)
    sha = per_second(lambda: hashlib.sha256(data).digest(), seconds)
    return {"rsa_sign_ms": 1000 / rsa, "sha256_mb_s": sha}


def run(pem: bytes, sizes: dict[str, int], seconds: float) -> dict[str, dict[str, float]]:
    """{size label: {signer: signatures per CPU second}} for one round.

    The signers take turns in short slices rather than one after the other: this machine's
    speed drifts within seconds (one RSA-2048 signature has measured 0.39 and 0.56 ms minutes
    apart), and a ratio is only fair when both sides saw the same machine."""
    fns = signers(pem)
    slices = 5
    out: dict[str, dict[str, float]] = {}
    for label, size in sizes.items():
        message = make_message(size)
        calls = dict.fromkeys(fns, 0.0)
        cpu = dict.fromkeys(fns, 0.0)
        for fn in fns.values():  # warm-up, as in per_second
            t0 = time.monotonic()
            while time.monotonic() - t0 < min(0.25, seconds / 4):
                fn(message)
        for _ in range(slices):
            for name, fn in fns.items():
                c0 = time.process_time()
                t0 = time.monotonic()
                runs = 0
                while runs < 2 or time.monotonic() - t0 < seconds / slices:
                    fn(message)
                    runs += 1
                cpu[name] += time.process_time() - c0
                calls[name] += runs
        out[label] = {name: calls[name] / max(cpu[name], 1e-9) for name in fns}
    return out
