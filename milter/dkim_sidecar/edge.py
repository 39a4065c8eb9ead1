"""The MTA's bytes at the edge of the DKIM core, which takes CRLF only: header values and
body chunks as Postfix sends them (bare LF possible, a line end split across chunks), turned
into CRLF, with the long-line check on the way (Postfix folds lines over 998 octets after the
milters ran, which breaks every signature). One pass per chunk in C where the helper built.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .dkim import canon

_LONG_LINE = 998  # RFC 5322 §2.1.1: at most 998 octets per line, CRLF excluded


class LongLineScanner:
    """Tells whether a CRLF body has a line over 998 octets, chunk by chunk (pure Python).

    Postfix's SMTP client folds such lines after every milter ran (smtp_line_length_limit),
    which breaks every signature over them. rfind() from the window's end jumps about a whole
    line-limit per step, so a normal body costs about one step per 1000 octets.
    """

    __slots__ = ("_cur", "found")

    def __init__(self) -> None:
        self._cur = 0  # octets of the current line seen so far
        self.found = False

    def update(self, chunk: bytes) -> None:
        if self.found:
            return
        limit = _LONG_LINE + 2  # the LF may stand at most this far from the line start
        n = len(chunk)
        pos, cur = 0, self._cur
        while True:
            end = pos + limit - cur
            if end > n:
                last = chunk.rfind(b"\n", pos)
                cur = cur + n - pos if last < 0 else n - last - 1
                if cur > limit - 1:
                    self.found = True
                self._cur = cur
                return
            last = chunk.rfind(b"\n", pos, end)
            if last < 0:
                self.found = True
                return
            pos, cur = last + 1, 0


_BARE_LF = re.compile(rb"(?<!\r)\n")


class CrlfFixer:
    """The MTA's line ends turned into CRLF at the edge (the DKIM core takes CRLF only): bare
    LF → CRLF (pure Python). A CR ending one chunk and the LF starting the next are one line
    end."""

    __slots__ = ("_prev_cr",)

    def __init__(self) -> None:
        self._prev_cr = False

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        prev_cr, self._prev_cr = self._prev_cr, chunk.endswith(b"\r")
        lf = chunk.count(b"\n")
        if not lf:
            return chunk
        crlf = chunk.count(b"\r\n") + (1 if prev_cr and chunk[:1] == b"\n" else 0)
        if lf == crlf:  # the common case: nothing to change, no copy
            return chunk
        return _fix_bare_lf(chunk, prev_cr)


def _fix_bare_lf(chunk: bytes, prev_cr: bool) -> bytes:
    if prev_cr and chunk[:1] == b"\n":
        return b"\n" + _BARE_LF.sub(b"\r\n", chunk[1:])
    return _BARE_LF.sub(b"\r\n", chunk)


class BodyEdge:
    """The body as the MTA sends it, made ready for the core: bare LF → CRLF, and lines over
    998 octets noted (`long_line`). Postfix sends CRLF, so the fix is almost never needed, but
    finding that out must be cheap: with the C helper it is one pass over each chunk, where
    the pure-Python fallback (CrlfFixer and LongLineScanner) takes several."""

    __slots__ = ("_c", "_fallback", "_line", "_prev", "long_line")

    def __init__(self) -> None:
        self._prev = 0  # the last octet of the previous chunk
        self._line = 0  # octets of the line still open
        self.long_line = False
        helper = canon.scan_helper
        # the C helper's edge() and its two flags, looked up once; else the pure-Python pair
        self._c: tuple[Callable[[bytes, int, int, int], tuple[int, int]], int, int] | None = (
            None if helper is None else (helper.edge, helper.BARE_LF, helper.LONG_LINE)
        )
        self._fallback = None if helper is not None else (CrlfFixer(), LongLineScanner())

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        if self._c is None:
            assert self._fallback is not None
            fixer, scanner = self._fallback
            chunk = fixer(chunk)
            scanner.update(chunk)
            self.long_line = scanner.found
            return chunk
        edge, bare_lf, long_line = self._c
        prev, line = self._prev, self._line
        flags, self._line = edge(chunk, prev, line, _LONG_LINE)
        if flags & bare_lf:
            chunk = _fix_bare_lf(chunk, prev == 13)
            # again over the fixed chunk: each CR added lengthens its line by one octet
            flags, self._line = edge(chunk, prev, line, _LONG_LINE)
        self._prev = chunk[-1]
        if flags & long_line:
            self.long_line = True
        return chunk


def header_value_to_crlf(value: bytes) -> bytes:
    """A header value as Postfix sends it (folds as LF) with CRLF folds."""
    if b"\n" not in value:
        return value
    return value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
