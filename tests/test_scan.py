"""The C helper (`dkim_sidecar._scan`) and the pure-Python path give the same answers."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dkim_sidecar import canon, session

helper = canon.scan_helper
pytestmark = pytest.mark.skipif(helper is None, reason="the C helper is not built")

# bodies made of the octets that matter (SP, HTAB, CR, LF) and a few ordinary ones
octets = st.lists(
    st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"Z", b"\x00", b"\xff", b"x" * 300]),
    max_size=60,
).map(b"".join)


def reference_flags(data: bytes, prev: int, line_len: int, limit: int) -> tuple[int, int]:
    """What scan() must answer, written the slow and obvious way."""
    assert helper is not None
    flags = 0
    text = bytes([prev]) + data if prev else data
    shift = 1 if prev else 0
    for m in re.finditer(rb"\n", text):
        if m.start() < shift:
            continue
        if m.start() == 0 or text[m.start() - 1 : m.start()] != b"\r":
            flags |= helper.BARE_LF
    if b"\t" in data:
        flags |= helper.TAB
    if b"  " in text[(0 if prev == 32 else shift) :]:
        flags |= helper.SPACE_RUN
    if b" \r\n" in text and text.find(b" \r\n") + 2 >= shift:  # the LF must be in data
        flags |= helper.SPACE_CRLF
    # line lengths: octets before each LF, the first line continuing line_len
    pieces = data.split(b"\n")
    lengths = [line_len + len(pieces[0]), *(len(p) for p in pieces[1:])]
    if any(n > limit + 1 for n in lengths):
        flags |= helper.LONG_LINE
    return flags, lengths[-1]


@settings(max_examples=400)
@given(data=octets, prev=st.sampled_from([0, 13, 32, 97]), line_len=st.integers(0, 1200))
def test_scan_flags_match_the_reference(data: bytes, prev: int, line_len: int) -> None:
    assert helper is not None
    assert helper.scan(data, prev, line_len, 998) == reference_flags(data, prev, line_len, 998)


@settings(max_examples=300)
@given(lines=st.lists(octets.map(lambda b: b.replace(b"\r\n", b"") + b"\r\n"), max_size=20))
def test_relaxed_whitespace_c_and_python_agree(lines: list[bytes]) -> None:
    block = b"".join(lines)
    assert canon._relax_wsp_c(block) == canon._relax_wsp_python(block)


@settings(max_examples=300)
@given(body=octets, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_body_edge_c_and_python_agree(body: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points) if b > a]
    fast = session.BodyEdge()
    saved = canon.scan_helper
    canon.scan_helper = None
    try:
        slow = session.BodyEdge()
    finally:
        canon.scan_helper = saved
    out_fast = b"".join(fast(c) for c in chunks)
    out_slow = b"".join(slow(c) for c in chunks)
    assert out_fast == out_slow
    assert fast.long_line == slow.long_line


def test_long_line_edges() -> None:
    for n, long in ((998, False), (999, True)):
        edge = session.BodyEdge()
        edge(b"x" * (n - 10))
        edge(b"x" * 10 + b"\r")
        edge(b"\nok\r\n")
        assert edge.long_line is long, n
