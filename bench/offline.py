"""Offline signing in this process: our MessageSigner against dkimpy's `dkim.sign`, on the same
message and key, and the two limits (one RSA-2048 signature, SHA-256 over the body)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import dkim

from common import DOMAIN, SELECTOR, make_message
from dkim_sidecar.config import Config
from dkim_sidecar.header import split_message
from dkim_sidecar.keys import SigningKey
from dkim_sidecar.runtime import policy_of
from dkim_sidecar.signer import MessageSigner


def per_second(fn: Callable[[], object], seconds: float, min_runs: int = 3) -> float:
    """Calls per CPU second of this process (CPU, not wall: other work on the machine does
    not count against it)."""
    fn()  # warm up
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
    """{size label: {signer: signatures per CPU second}} for one round."""
    fns = signers(pem)
    out: dict[str, dict[str, float]] = {}
    for label, size in sizes.items():
        message = make_message(size)
        out[label] = {
            name: per_second(lambda f=fn, m=message: f(m), seconds) for name, fn in fns.items()
        }
    return out
