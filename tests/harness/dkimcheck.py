"""Verify DKIM signatures with dkimpy against a stubbed DNS table (no network).

``dns`` maps key record names to TXT data, e.g.
``{"sel._domainkey.example.com.": b"v=DKIM1; k=rsa; p=MIIB..."}``; names are matched
case-insensitively, with or without the trailing dot. A name that is not in the table
behaves like NXDOMAIN (the signature then fails, it does not raise).

Order of results: dkimpy's ``DKIM.verify(idx=i)`` counts DKIM-Signature header fields in
message order, so index 0 is the *topmost* field, i.e. the signature added last on the
way (a signer prepends its field). ``verify_all`` and ``signature_domains`` use the same
order.

dkimpy raises (``dkim.ValidationError``) on a body hash mismatch rather than returning
False; that and every other ``dkim.DKIMException`` counts as a failed signature here, and
the reason is kept in ``SignatureResult.error``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import dkim
from dkim.util import parse_tag_value

__all__ = [
    "SignatureResult",
    "dkim_signature_fields",
    "signature_domains",
    "verify",
    "verify_all",
    "verify_results",
]

DnsTable = Mapping[str, bytes | str]


@dataclass(frozen=True)
class SignatureResult:
    index: int
    domain: str
    selector: str
    ok: bool
    error: str = ""


def _norm(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.rstrip(".").lower()


def _dnsfunc(dns: DnsTable) -> Callable[..., bytes | None]:
    table = {_norm(k): (v.encode() if isinstance(v, str) else v) for k, v in dns.items()}

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        return table.get(_norm(name))

    return lookup


def _unfold(value: bytes) -> bytes:
    return re.sub(rb"\r?\n(?=[ \t])", b"", value)


def dkim_signature_fields(message: bytes) -> list[dict[bytes, bytes]]:
    """Tag dicts of every DKIM-Signature header field, top to bottom (dkimpy's parser)."""
    headers, _body = dkim.rfc822_parse(message)
    return [
        parse_tag_value(_unfold(value))
        for name, value in headers
        if name.lower() == b"dkim-signature"
    ]


def signature_domains(message: bytes) -> list[str]:
    """The d= value of each DKIM-Signature, top to bottom."""
    return [
        tags.get(b"d", b"").decode("ascii", "replace") for tags in dkim_signature_fields(message)
    ]


def verify_results(message: bytes, dns: DnsTable) -> list[SignatureResult]:
    """Verify every DKIM-Signature (top to bottom) and say why one failed."""
    lookup = _dnsfunc(dns)
    results = []
    for i, tags in enumerate(dkim_signature_fields(message)):
        domain = tags.get(b"d", b"").decode("ascii", "replace")
        selector = tags.get(b"s", b"").decode("ascii", "replace")
        d = dkim.DKIM(message)
        try:
            ok = bool(d.verify(idx=i, dnsfunc=lookup))
            error = "" if ok else "signature did not verify (bad b=, or key missing/invalid)"
        except dkim.DKIMException as e:
            ok, error = False, f"{type(e).__name__}: {e}"
        results.append(SignatureResult(i, domain, selector, ok, error))
    return results


def verify_all(message: bytes, dns: DnsTable) -> list[bool]:
    """One bool per DKIM-Signature field, in dkimpy's index order (topmost first)."""
    return [r.ok for r in verify_results(message, dns)]


def verify(message: bytes, dns: DnsTable, domain: str | None = None) -> bool:
    """True iff the message has at least one DKIM-Signature (with d= ``domain``, if
    given) and every such signature verifies."""
    results = verify_results(message, dns)
    if domain is not None:
        results = [r for r in results if r.domain.lower() == domain.lower()]
    return bool(results) and all(r.ok for r in results)
