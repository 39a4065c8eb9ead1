"""The C helper (`dkim_sidecar.dkim._scan`) and the pure-Python path give the same answers.

edge() and relax() of every build against slow references: test_scan_paths.py."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dkim_sidecar import edge as edges
from dkim_sidecar.dkim import canon

helper = canon.scan_helper
# pyproject.toml marks the extension optional, so `pip install -e` goes on without it when the
# build fails; `make test` installs gcc and builds it, so its absence is a broken build.
needs_c = pytest.mark.skipif(
    helper is None,
    reason="the C helper dkim_sidecar.dkim._scan did not build or import: see the output of "
    "`pip install -e .` (gcc and python3-dev, which `make test` installs, are needed)",
)

# bodies made of the octets that matter (SP, HTAB, CR, LF) and a few ordinary ones
octets = st.lists(
    st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"Z", b"\x00", b"\xff", b"x" * 300]),
    max_size=60,
).map(b"".join)


def python_edge() -> edges.BodyEdge:
    """A BodyEdge on the pure-Python fallback (CrlfFixer, LongLineScanner)."""
    saved = canon.scan_helper
    canon.scan_helper = None
    try:
        return edges.BodyEdge()
    finally:
        canon.scan_helper = saved


@needs_c
@settings(max_examples=300)
@given(lines=st.lists(octets.map(lambda b: b.replace(b"\r\n", b"") + b"\r\n"), max_size=20))
def test_relaxed_whitespace_c_and_python_agree(lines: list[bytes]) -> None:
    assert helper is not None
    block = b"".join(lines)
    assert helper.relax(block) == canon._relax_wsp_python(block)


@needs_c
@settings(max_examples=300)
@given(body=octets, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_body_edge_c_and_python_agree(body: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points) if b > a]
    fast = edges.BodyEdge()
    slow = python_edge()
    out_fast = b"".join(fast(c) for c in chunks)
    out_slow = b"".join(slow(c) for c in chunks)
    assert out_fast == out_slow
    assert fast.long_line == slow.long_line


def test_long_line_edges() -> None:
    for n, long in ((998, False), (999, True)):
        edge = edges.BodyEdge()
        edge(b"x" * (n - 10))
        edge(b"x" * 10 + b"\r")
        edge(b"\nok\r\n")
        assert edge.long_line is long, n


def _bare_lf_bodies(n: int) -> Iterator[tuple[str, list[bytes]]]:
    """A line of n octets ended by a bare LF: alone, inside a chunk, and cut at every place
    that matters (the LF starting the next chunk, the line split in two)."""
    line = b"x" * n
    yield "alone", [line + b"\n"]
    yield "middle", [b"a\r\n" + line + b"\nb\r\n"]
    yield "lf starts the next chunk", [b"a\r\n" + line, b"\nb\r\n"]
    yield "line split", [b"a\r\n" + line[:500], line[500:] + b"\nb\r\n"]
    yield "line split, lf alone", [line[:500], line[500:], b"\n"]


@pytest.mark.parametrize(
    "path", [pytest.param("c", marks=needs_c), pytest.param("python", id="python")]
)
@pytest.mark.parametrize(("n", "long"), [(998, False), (999, True)])
def test_long_line_ended_by_a_bare_lf(path: str, n: int, long: bool) -> None:
    # RFC 5322 §2.1.1: 998 octets before the CRLF. The bare LF becomes CRLF first, so 999
    # octets and a bare LF are one over, though 999 octets and the LF alone are not.
    for name, chunks in _bare_lf_bodies(n):
        edge = edges.BodyEdge() if path == "c" else python_edge()
        out = b"".join(edge(c) for c in chunks)
        assert out == b"".join(chunks).replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
        assert edge.long_line is long, name
