"""Write the GOLDEN signatures (tests/vectors/golden_*.sig) with the signer as it is now.

    .venv/bin/python tests/vectors/regenerate.py

They are a regression guard, not an oracle: test_signer.py's test_golden_signature_bytes
compares the signer with them byte for byte and has dkimpy verify them. Run this only when a
change of the signer's output is meant, then read `git diff tests/vectors` and run that test.
The vectors are defined here, once, for this script and for the test."""

from __future__ import annotations

import functools
from pathlib import Path

from dkim_sidecar.dkim.canon import Canonicalization
from dkim_sidecar.dkim.header import split_message
from dkim_sidecar.dkim.keys import SigningKey
from dkim_sidecar.dkim.signer import MessageSigner, SigningPolicy

HERE = Path(__file__).resolve().parent
NOW = 1_700_000_000  # the fixed clock: t= of every golden signature
MESSAGE = (HERE / "golden_message.eml").read_bytes()

_HEADERS = ("from", "to", "cc", "subject", "date", "message-id")
_OVERSIGN = frozenset({"from", "to", "cc", "subject"})

# file -> (the keys, in signing order; the policy; the time dkimpy must see to accept x=, or
# None for a signature without x=)
GOLDEN: dict[str, tuple[tuple[str, ...], SigningPolicy, int | None]] = {
    "golden_relaxed_dual.sig": (
        ("rsa", "ed"),
        SigningPolicy(Canonicalization.parse("relaxed/relaxed"), _HEADERS, _OVERSIGN),
        None,
    ),
    "golden_simple_relaxed_expiring.sig": (
        ("ed",),
        SigningPolicy(
            Canonicalization.parse("simple/relaxed"),
            (*_HEADERS, "received"),
            _OVERSIGN,
            expire_after=7 * 86400,
        ),
        NOW + 60,
    ),
}


@functools.cache
def keys() -> dict[str, SigningKey]:
    """The RFC 8463 A.1 keys: deterministic signatures (Ed25519, RSASSA-PKCS1-v1_5)."""
    return {
        "ed": SigningKey.load("example.com", "ed", (HERE / "rfc8463_a1_ed25519.seed").read_bytes()),
        "rsa": SigningKey.load("example.com", "rsa", (HERE / "rfc8463_a1_rsa.pem").read_bytes()),
    }


def signatures(name: str) -> bytes:
    """The DKIM-Signature fields the signer makes now for the golden file `name`."""
    key_names, policy, _ = GOLDEN[name]
    fields, body = split_message(MESSAGE)
    signer = MessageSigner([keys()[k] for k in key_names], policy, NOW)
    signer.update(body)
    return b"".join(signer.sign(fields))


def main() -> None:
    for name in sorted(GOLDEN):
        path = HERE / name
        old = path.read_bytes() if path.exists() else None
        new = signatures(name)
        path.write_bytes(new)
        print(f"{path}: {'unchanged' if new == old else 'WRITTEN, read the diff'}")


if __name__ == "__main__":
    main()
