"""DKIM canonicalization, RFC 6376 §3.4: pure functions over bytes, no I/O.

The core accepts CRLF line ends only; turning an MTA's bare LF into CRLF is the job of the
edge that talks to the MTA. Inside the core a bare CR or a bare LF is an ordinary octet of a
line, as RFC 6376 §3.4 treats it.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

scan_helper: ModuleType | None
try:  # the optional C helper (pyproject: ext-modules); the same answers without it, slower
    from . import _scan as scan_helper
except ImportError:  # pragma: no cover - the tests run the Python path explicitly too
    scan_helper = None

CRLF = b"\r\n"
_WSP_RUN = re.compile(rb"[ \t]+")
_WSP = b" \t"

# A partial line (no CRLF yet) is held back between chunks; past this size its safe prefix is
# pushed through so that a body without line breaks cannot grow memory without bound.
_MAX_CARRY = 64 * 1024


class Canon(enum.Enum):
    """One canonicalization algorithm (RFC 6376 §3.4)."""

    SIMPLE = "simple"
    RELAXED = "relaxed"


@dataclass(frozen=True)
class Canonicalization:
    """The c= pair: header/body (RFC 6376 §3.5, tag c=)."""

    header: Canon
    body: Canon

    @classmethod
    def parse(cls, text: str) -> Canonicalization:
        """Parse `relaxed/relaxed`, `simple/relaxed`, ...; a lone value means `value/simple`.

        Raises ValueError naming what was expected.
        """
        parts = text.strip().lower().split("/")
        if len(parts) == 1:
            parts.append("simple")  # RFC 6376 §3.5: c=relaxed means relaxed/simple
        if len(parts) != 2:
            raise ValueError(f"{text!r} is not a canonicalization (expected e.g. relaxed/relaxed)")
        try:
            return cls(Canon(parts[0]), Canon(parts[1]))
        except ValueError:
            raise ValueError(
                f"{text!r} is not a canonicalization "
                "(expected simple or relaxed for header and body, e.g. relaxed/relaxed)"
            ) from None

    def __str__(self) -> str:
        return f"{self.header.value}/{self.body.value}"


# --- headers -----------------------------------------------------------------------------------


def canon_header_simple(field: bytes) -> bytes:
    """RFC 6376 §3.4.1: the header field exactly as it is, final CRLF included."""
    return field


def canon_header_relaxed(field: bytes) -> bytes:
    """RFC 6376 §3.4.2 for one whole field (`Name: value` with folds and its final CRLF).

    Lowercase the name, unfold (delete each CRLF), turn each WSP run into one SP, delete WSP at
    the ends of the value and around the colon; the result ends in CRLF.
    """
    name, sep, value = field.partition(b":")
    if not sep:
        raise ValueError("header field without a colon")
    value = value.replace(CRLF, b"")
    if b"\t" in value or b"  " in value:  # most values have single spaces only: no regex
        value = _WSP_RUN.sub(b" ", value)
    return name.rstrip(_WSP).lower() + b":" + value.strip(_WSP) + CRLF


def canon_header(canon: Canon, field: bytes) -> bytes:
    if canon is Canon.RELAXED:
        return canon_header_relaxed(field)
    return canon_header_simple(field)


# --- body --------------------------------------------------------------------------------------


Block = bytes | memoryview  # whole lines of a chunk are passed on as views of it, not copies


def _relax_wsp_python(block: Block) -> Block:
    """§3.4.4 a, b over whole lines: each WSP run becomes one SP, WSP before a CRLF goes."""
    if isinstance(block, memoryview):
        block = block.tobytes()  # bytes has the fast `in` and replace(); the C path needs neither
    if b" " not in block and b"\t" not in block:
        return block  # one-octet scans (memchr): base64 bodies skip the rest
    if b"\t" in block or b"  " in block:
        block = _WSP_RUN.sub(b" ", block)
    if b" \r\n" in block:
        block = block.replace(b" \r\n", CRLF)
    return block


# The C helper does the same in one pass, and hands back the block itself (no copy) when
# nothing changes.
_relax_wsp: Callable[[Block], Block] = (
    _relax_wsp_python if scan_helper is None else scan_helper.relax
)


def _count_trailing_crlf(data: Block) -> int:
    """How many whole CRLF pairs end `data` (`\\n\\r\\n` ends with one, not two)."""
    end = len(data)
    n = 0
    while end >= 2 and data[end - 1] == 10 and data[end - 2] == 13:
        end -= 2
        n += 1
    return n


class BodyCanonicalizer:
    """Streaming body canonicalization, RFC 6376 §3.4.3 (simple) and §3.4.4 (relaxed).

    Feed the body with `update()` in chunks of any size and split, then call `finish()` once.
    The canonical body goes to `write`, as bytes or as views of the chunks given (memoryview:
    whole lines are not copied). The body itself is never held, only the current partial line
    (bounded by _MAX_CARRY) and a count of pending empty lines: trailing empty lines must be
    dropped (§3.4.3, §3.4.4 c), and only the end of the body tells which lines trail.
    """

    __slots__ = ("_carry", "_emitted", "_finished", "_line_open", "_pending", "_relaxed", "_write")

    def __init__(self, canon: Canon, write: Callable[[Block], object]) -> None:
        self._relaxed = canon is Canon.RELAXED
        self._write = write
        self._carry = b""  # octets of the current line not yet passed on (never a CRLF)
        self._pending = 0  # empty lines held back: they may be trailing
        self._line_open = False  # a prefix of the current line was already passed on
        self._emitted = False
        self._finished = False

    def update(self, chunk: bytes) -> None:
        if self._finished:
            raise RuntimeError("update() after finish()")
        if not chunk:
            return
        # Neither the chunk nor its whole lines are copied: the carried partial line is
        # completed on its own (a short copy), the lines after it go on as a view of the chunk.
        start = 0
        if self._carry:
            if self._carry[-1] == 13 and chunk[0] == 10:
                start = 1  # the CR ending the carry and this LF are one CRLF
            else:
                start = chunk.find(CRLF) + 2
                if start < 2:  # no line end yet: all of it belongs to the current line
                    self._carry += chunk
                    if len(self._carry) > _MAX_CARRY:
                        self._flush_partial()
                    return
            line, self._carry = self._carry + chunk[:start], b""
            self._lines(line)
        cut = chunk.rfind(CRLF, start) + 2
        if cut >= start + 2:
            if start == 0 and cut == len(chunk):
                self._lines(chunk)
            else:
                self._lines(memoryview(chunk)[start:cut])
            start = cut
        if start < len(chunk):
            self._carry = chunk[start:]
            if len(self._carry) > _MAX_CARRY:
                self._flush_partial()

    def _emit(self, data: Block) -> None:
        if self._pending:
            self._write(CRLF * self._pending)
            self._pending = 0
        self._write(data)
        self._emitted = True

    def _lines(self, block: Block) -> None:
        """Canonicalize whole lines: `block` starts a line and ends with CRLF."""
        if self._relaxed:
            # §3.4.4 a, b: a WSP run becomes one SP; WSP at a line end goes. The C helper
            # hands a block that needs neither (base64, most prose) back as it is: no copy.
            block = _relax_wsp(block)
        trailing = _count_trailing_crlf(block)
        content_end = len(block) - 2 * trailing
        if content_end == 0 and not self._line_open:
            self._pending += trailing  # only empty lines: hold them back
            return
        # The first trailing CRLF ends the last non-empty line; the others may trail the body.
        self._emit(block[: content_end + 2] if trailing > 1 else block)
        self._pending = trailing - 1
        self._line_open = False

    def _flush_partial(self) -> None:
        """Pass on the safe prefix of a long partial line: all but a final CR (an LF may follow)
        and, for relaxed, the WSP just before it (it may end the line). Only the last CR can
        still pair with an LF: a CR before it is line content already."""
        data = self._carry
        cr = 1 if data.endswith(b"\r") else 0
        if self._relaxed:
            data = _WSP_RUN.sub(b" ", data)  # a run is one SP now: at most one octet held
            safe = len(data[: len(data) - cr].rstrip(_WSP))
        else:
            safe = len(data) - cr
        self._carry = data[safe:]
        if safe:
            self._emit(data[:safe])
            self._line_open = True

    def finish(self) -> None:
        """End of body: close an unterminated last line, apply the empty-body rules."""
        if self._finished:
            return
        self._finished = True
        tail, self._carry = self._carry, b""
        if self._relaxed and tail:
            # §3.4.4 a: the last line loses its trailing WSP whether or not a CRLF ends it
            tail = _WSP_RUN.sub(b" ", tail).rstrip(_WSP)
        if tail or self._line_open:
            # §3.4.3, §3.4.4: a non-empty body that does not end with CRLF gets one
            self._emit(tail + CRLF)
        elif not self._relaxed and not self._emitted:
            # §3.4.3: an empty body (or one of empty lines only) is a single CRLF;
            # §3.4.4: relaxed leaves it empty
            self._pending = 0
            self._emit(CRLF)


class BodyHasher:
    """Canonicalize and SHA-256 a body as it streams in: `update()`, then `digest()`."""

    __slots__ = ("_canon", "_digest", "_hash")

    def __init__(self, canon: Canon) -> None:
        self._hash = hashlib.sha256()
        self._canon = BodyCanonicalizer(canon, self._hash.update)
        self._digest: bytes | None = None

    def update(self, chunk: bytes) -> None:
        self._canon.update(chunk)

    def digest(self) -> bytes:
        if self._digest is None:
            self._canon.finish()
            self._digest = self._hash.digest()
        return self._digest


def canonicalize_body(canon: Canon, body: bytes) -> bytes:
    """The whole canonical body at once (tests, CLI). The milter streams instead."""
    out: list[Block] = []
    c = BodyCanonicalizer(canon, out.append)
    c.update(body)
    c.finish()
    return b"".join(out)
