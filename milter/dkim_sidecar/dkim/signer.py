"""DKIM signing of one message, RFC 6376 §5 and RFC 8463: streaming body, then headers.

No I/O: the caller streams the body in with `update()` and hands over the header fields with
`sign()`; what comes back is the DKIM-Signature fields to prepend, exact bytes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from .canon import (
    CRLF,
    BodyHasher,
    Canon,
    Canonicalization,
    canon_header,
    canon_header_relaxed,
    canon_header_simple,
)
from .header import HeaderField, select_headers
from .keys import SigningKey

FIELD_NAME = b"DKIM-Signature"
_WIDTH = 78  # RFC 5322 §2.1.1: lines SHOULD stay under 78 characters
_FOLD = b"\r\n\t"
_B_MIN = 8  # base64 characters of b= kept on the line of the tag


@dataclass(frozen=True)
class SigningPolicy:
    """What every signature of a deployment shares (built once per config, not per message)."""

    canonicalization: Canonicalization
    sign_headers: tuple[str, ...]
    oversign_headers: frozenset[str] = frozenset()
    expire_after: int | None = None

    def __post_init__(self) -> None:
        if "from" not in self.sign_headers:
            raise ValueError("sign_headers must include From (RFC 6376 §5.4)")


def fold_tags(tags: Sequence[tuple[str, str]], first_line: int) -> bytes:
    """Lay `tag=value;` items out in lines under _WIDTH, folding only between items and, inside
    h=, before a colon (RFC 6376 §3.5 allows FWS around it). `first_line` is what precedes on
    line 1."""
    text, _ = _fold_items(tuple(tags), first_line, False, True)
    return text.encode("ascii")


def _fold_items(
    tags: tuple[tuple[str, str], ...], col: int, after_items: bool, last_ends: bool
) -> tuple[str, int]:
    """fold_tags' work, from column `col`; `after_items`: items precede on this line;
    `last_ends`: the last tag is the end of the list (no `;` after it). Cached: the tags up
    to h= repeat from message to message (within a second, and for the same header set)."""
    out: list[str] = []
    for i, (tag, value) in enumerate(tags):
        last = last_ends and i == len(tags) - 1
        pieces = value.split(":") if tag == "h" else [value]
        item = [f"{tag}={pieces[0]}", *pieces[1:]]
        for j, piece in enumerate(item):
            text = piece if j == 0 else ":" + piece
            if j == len(item) - 1 and not last:
                text += ";"
            started = bool(out) or after_items
            sep = "" if not started else (" " if j == 0 else "")
            # b= is followed by its value on the same line: leave room for some of it
            room = _B_MIN if tag == "b" else 0
            if started and col + len(sep) + len(text) + room > _WIDTH:
                out.append("\r\n\t")
                col = 8  # a tab counts as up to 8 columns
                sep = ""
            out.append(sep + text)
            col += len(sep) + len(text)
    return "".join(out), col


_fold = functools.lru_cache(maxsize=256)(_fold_items)


def fold_b64(value: bytes, col: int) -> bytes:
    """Fold a base64 b= value (FWS may go anywhere in it, RFC 6376 §3.5)."""
    first = max(_WIDTH - col, _B_MIN)
    parts = [value[:first]]
    rest = value[first:]
    step = _WIDTH - 8
    parts.extend(rest[i : i + step] for i in range(0, len(rest), step))
    return _FOLD.join(parts)


class MessageSigner:
    """Signs one message with one or more keys (dual signing: RSA and Ed25519, RFC 8463 §1).

    All keys share one body hash: both algorithms hash with SHA-256 under the same c=.
    """

    __slots__ = ("_body", "_keys", "_now", "_policy")

    def __init__(self, keys: Sequence[SigningKey], policy: SigningPolicy, now: int) -> None:
        if not keys:
            raise ValueError("no signing keys")
        self._keys = tuple(keys)
        self._policy = policy
        self._now = now
        self._body = BodyHasher(policy.canonicalization.body)

    def update(self, chunk: bytes) -> None:
        """Stream body bytes in (CRLF line ends), in chunks of any size and split."""
        self._body.update(chunk)

    def sign(self, fields: Sequence[HeaderField]) -> list[bytes]:
        """The DKIM-Signature fields (each `DKIM-Signature: ...` + CRLF), one per key, in key
        order; prepend them to the header, first one topmost."""
        policy = self._policy
        hcanon = policy.canonicalization.header
        bh = base64.b64encode(self._body.digest()).decode("ascii")
        names, chosen = select_headers(fields, policy.sign_headers, policy.oversign_headers)
        # RFC 6376 §3.7: the selected fields in h= order, then the signature field itself
        canon = canon_header_relaxed if hcanon is Canon.RELAXED else canon_header_simple
        signed = b"".join([canon(raw) for raw in chosen])
        out = []
        for key in self._keys:
            tags = [
                ("v", "1"),
                ("a", key.algorithm.value),
                ("c", str(policy.canonicalization)),
                ("d", key.domain),
                ("s", key.selector),
                ("t", str(self._now)),
            ]
            if policy.expire_after is not None:
                tags.append(("x", str(self._now + policy.expire_after)))
            tags += [("h", ":".join(names)), ("bh", bh), ("b", "")]
            # the tags up to h= repeat (cached); bh= and b= are new for every message
            fixed, col = _fold(tuple(tags[:-2]), len(FIELD_NAME) + 2, False, False)
            rest, _ = _fold_items(tuple(tags[-2:]), col, True, True)
            head = FIELD_NAME + b": " + (fixed + rest).encode("ascii")
            # §3.7: the field as it will stand with b= empty, canonicalized, no final CRLF
            digest = hashlib.sha256(signed + _canon_without_crlf(hcanon, head)).digest()
            b = base64.b64encode(key.sign_digest(digest))
            col = len(head) - head.rfind(b"\n") - 1 + 7  # the tab is wider than one column
            out.append(head + fold_b64(b, col) + CRLF)
        return out


def _canon_without_crlf(canon: Canon, field: bytes) -> bytes:
    return canon_header(canon, field + CRLF)[:-2]
