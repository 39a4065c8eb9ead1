"""Header fields as exact bytes: splitting, selection for h=, From and DKIM-Signature parsing.

Pure functions over bytes (RFC 5322 §2.2, RFC 6376 §5.4). A field is kept exactly as it came
(`Name:value` with its folds and final CRLF); nothing is rebuilt from name and value.
"""

from __future__ import annotations

import email.utils
import enum
import functools
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .keys import KeyLoadError, check_dns_name, parse_tag_list

CRLF = b"\r\n"
_WSP = b" \t"
# RFC 5322 §2.2 field-name = 1*ftext (printable US-ASCII but ":"), and §4.5.1's obsolete
# white space before the colon. Anything else is no header field (Postfix's is_header agrees).
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


class HeaderField(NamedTuple):
    """One header field: lowercase name (for matching) and the raw field bytes, CRLF-ended."""

    name: str
    raw: bytes


def make_field(name: bytes, value: bytes) -> HeaderField:
    """Join a name and a value exactly as the MTA gave them (value with its leading space)."""
    return HeaderField(
        name.decode("ascii", "replace").rstrip(" \t").lower(), name + b":" + value + CRLF
    )


def split_message(message: bytes) -> tuple[list[HeaderField], bytes]:
    """Split a CRLF message into header fields and body (RFC 5322 §2.1).

    A line that is neither a field nor a continuation ends the header (as the MTA would treat
    it, it belongs to the body then; see with_body_separator).
    """
    fields: list[HeaderField] = []
    pos = 0
    n = len(message)
    while pos < n:
        if message.startswith(CRLF, pos):
            return fields, message[pos + 2 :]
        end = message.find(CRLF, pos)
        end = n if end < 0 else end + 2
        line = message[pos:end]
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = HeaderField(last.name, last.raw + line)
        else:
            name = _FIELD_NAME.match(line)
            if name is None:
                return fields, message[pos:]
            raw = line if line.endswith(CRLF) else line + CRLF
            fields.append(
                HeaderField(raw[: name.end() - 1].decode("ascii").rstrip(" \t").lower(), raw)
            )
        pos = end
    return fields, b""


def with_body_separator(message: bytes) -> tuple[bytes, bool]:
    """The message with the empty line that must end its header block (RFC 5322 §2.1), and
    whether it had to be inserted.

    Where a line that is neither a field nor a continuation follows the header fields, Postfix's
    cleanup inserts the empty line before it, so that line is body. A signer must do the same
    before it signs, or it writes a message whose header block every verifier parses
    differently from the signer: no verifier would accept the signature.
    """
    _, body = split_message(message)
    head = message[: len(message) - len(body)]
    if not body or head == CRLF or head.endswith(CRLF + CRLF):
        return message, False
    return head + CRLF + body, True


def select_headers(
    fields: Sequence[HeaderField], sign: Iterable[str], oversign: frozenset[str]
) -> tuple[list[str], list[bytes]]:
    """Choose the fields to sign: the h= names and the raw fields in hash order.

    RFC 6376 §5.4.2: a name listed n times takes the n last instances, bottom-up. Each name
    in `sign` is listed once per instance present; an oversigned name once more, so that a
    field added later (or added where none was) breaks the signature (§8.15).
    """
    by_name: dict[str, list[bytes]] = {}
    for f in fields:
        same = by_name.get(f.name)
        if same is None:
            by_name[f.name] = [f.raw]
        else:
            same.append(f.raw)
    names: list[str] = []
    chosen: list[bytes] = []
    # most of the ~30 names in `sign` are absent from a given message: skipped at one lookup
    for name in sign:
        present = by_name.get(name)
        if present is not None:
            for raw in reversed(present):
                names.append(name)
                chosen.append(raw)
        if name in oversign:
            names.append(name)  # a null string to the hash (§5.4.2): signs absence
    return names, chosen


def field_value(raw: bytes) -> bytes:
    """The value of a raw field: after the colon, unfolded, WSP trimmed."""
    value = raw.partition(b":")[2]
    return value.replace(CRLF, b"").strip(_WSP)


class FromProblem(enum.StrEnum):
    """Why a message has no author domain."""

    NO_FROM = "no_from"
    MULTIPLE_FROM = "multiple_from"  # RFC 5322 §3.6: exactly one From
    BAD_FROM = "bad_from"  # no address, or addresses of several domains


class FromResult(NamedTuple):
    """The author domain (RFC 5322 §3.6.2), or why there is none."""

    domain: str | None
    reason: FromProblem | None


def from_domain(fields: Sequence[HeaderField]) -> FromResult:
    """The domain of the From field, for a DMARC-aligned d= (RFC 7489 §3.1)."""
    froms = [f for f in fields if f.name == "from"]
    if not froms:
        return FromResult(None, FromProblem.NO_FROM)
    if len(froms) > 1:
        return FromResult(None, FromProblem.MULTIPLE_FROM)
    value = field_value(froms[0].raw)
    if len(value) <= _CACHED_FROM:
        return _from_value_cached(value)
    return _from_value(value)


# Relay clients (printers, applications) send the same few From values again and again, and
# parsing one costs more than the rest of the header's handling: remember the answers.
_CACHED_FROM = 512


def _from_value(value: bytes) -> FromResult:
    text = value.decode("utf-8", "surrogateescape")
    domains = {address_domain(addr) for _, addr in email.utils.getaddresses([text])}
    domains.discard(None)
    if len(domains) != 1:
        return FromResult(None, FromProblem.BAD_FROM)
    return FromResult(domains.pop(), None)


_from_value_cached = functools.lru_cache(maxsize=4096)(_from_value)


def address_domain(address: str) -> str | None:
    """The checked, lowercase A-label domain of an address, or None."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    domain = domain.strip()
    if not at or not local or not domain or domain.startswith("["):
        return None  # an address literal has no domain to sign for
    try:
        return check_dns_name(domain)
    except (KeyLoadError, UnicodeError):
        return None


def signed_domains(fields: Sequence[HeaderField]) -> set[str]:
    """d= of each DKIM-Signature that looks complete (v=1, a=, b=, bh=, d=, s=)."""
    out: set[str] = set()
    for f in fields:
        if f.name != "dkim-signature":
            continue
        tags, _ = parse_tag_list(field_value(f.raw))  # what it has; invalid ones are skipped
        if tags.get("v") != b"1" or not all(tags.get(t) for t in ("a", "b", "bh", "d", "s")):
            continue
        try:
            out.add(check_dns_name(tags["d"].decode("ascii")))
        except (KeyLoadError, UnicodeError):
            continue
    return out
