"""Every build of the C helper against the pure-Python path: the one installed here (on x86-64
AVX2 when the CPU has it, else SSE2), the SSE2 one (built with DKIM_SCAN_NO_AVX2) and the
portable SWAR one that arm64 gets (DKIM_SCAN_PORTABLE). All must give the answers of
`_relax_wsp_python` and of the slow reference in test_scan.py, at every position against
their 64-octet blocks."""

from __future__ import annotations

import importlib.util
import itertools
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dkim_sidecar import canon
from dkim_sidecar.canon import BodyCanonicalizer, Canon

SOURCE = Path(canon.__file__).with_name("_scan.c")


def _build(tmp: Path, define: str) -> ModuleType | None:
    cc = shutil.which(sysconfig.get_config_var("CC").split()[0] or "cc") or shutil.which("cc")
    if cc is None:
        return None
    target = tmp / ("_scan" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cc, "-O2", "-fPIC", "-shared", f"-D{define}"]
    cmd += ["-I", sysconfig.get_paths()["include"], str(SOURCE), "-o", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    spec = importlib.util.spec_from_file_location("dkim_sidecar._scan", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    if canon.scan_helper is not None:
        found[canon.scan_helper.SIMD] = canon.scan_helper
    for define in ("DKIM_SCAN_NO_AVX2", "DKIM_SCAN_PORTABLE"):
        module = _build(tmp_path_factory.mktemp(define.lower()), define)
        if module is not None:
            found.setdefault(module.SIMD, module)
    if not found:
        pytest.skip("no C helper built and no C compiler")
    return found


def test_the_builds_are_the_expected_ones(builds: dict[str, ModuleType]) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    assert "swar" in builds
    if platform.machine() in ("x86_64", "AMD64"):
        assert "sse2" in builds


# filler before the interesting octets moves them across the 8- and 64-octet boundaries
pieces = st.lists(
    st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b" \r\n", b"  ", b"a", b"\x00", b"\xff"]),
    max_size=30,
).map(b"".join)
blocks = st.builds(
    lambda k, body, m: b"x" * k + body + b"y" * m, st.integers(0, 140), pieces, st.integers(0, 70)
)


def reference_flags(helper: ModuleType, data: bytes, prev: int, line_len: int) -> tuple[int, int]:
    """scan()'s answer, the slow way (as in test_scan.py, limit 998)."""
    flags = 0
    text = bytes([prev]) + data if prev else data
    shift = 1 if prev else 0
    for i, c in enumerate(text):
        if c == 10 and i >= shift and (i == 0 or text[i - 1] != 13):
            flags |= helper.BARE_LF
    if b"\t" in data:
        flags |= helper.TAB
    if b"  " in text[(0 if prev == 32 else shift) :]:
        flags |= helper.SPACE_RUN
    if b" \r\n" in text and text.find(b" \r\n") + 2 >= shift:
        flags |= helper.SPACE_CRLF
    lines = data.split(b"\n")
    lengths = [line_len + len(lines[0]), *(len(p) for p in lines[1:])]
    if any(n > 999 for n in lengths):
        flags |= helper.LONG_LINE
    return flags, lengths[-1]


@settings(max_examples=300)
@given(data=blocks, prev=st.sampled_from([0, 13, 32, 97]), line_len=st.integers(0, 1100))
def test_scan_every_build(
    builds: dict[str, ModuleType], data: bytes, prev: int, line_len: int
) -> None:
    for name, helper in builds.items():
        assert helper.scan(data, prev, line_len, 998) == reference_flags(
            helper, data, prev, line_len
        ), name


@settings(max_examples=300)
@given(data=blocks, prev=st.sampled_from([0, 13, 32, 97]), line_len=st.integers(0, 1100))
def test_edge_every_build(
    builds: dict[str, ModuleType], data: bytes, prev: int, line_len: int
) -> None:
    for name, helper in builds.items():
        flags, open_len = reference_flags(helper, data, prev, line_len)
        expected = (flags & (helper.BARE_LF | helper.LONG_LINE), open_len)
        assert helper.edge(data, prev, line_len, 998) == expected, name


@pytest.mark.parametrize("length", [997, 998, 999, 1000, 1063, 1064])
@pytest.mark.parametrize("lead", [0, 1, 63, 64, 65, 127, 500])
def test_long_lines_at_every_block_offset(
    builds: dict[str, ModuleType], length: int, lead: int
) -> None:
    # RFC 5322 §2.1.1: 998 octets before the CRLF are allowed, 999 are not. The edge watches
    # only the distance between blocks that hold an LF; lines that end or start anywhere in a
    # block must still be measured exactly, with and without a line carried in (line_len).
    for line_len in (0, 5, 998):
        for tail in (b"\r\nshort\r\n", b"\r\n", b""):
            data = b"a" * lead + b"\r\n" + b"b" * length + tail
            for name, helper in builds.items():
                for limit in (998, 40):  # 40: below a block, the edge takes the full scan
                    full = helper.scan(data, 0, line_len, limit)
                    mask = helper.BARE_LF | helper.LONG_LINE
                    got = helper.edge(data, 0, line_len, limit)
                    assert got == (full[0] & mask, full[1]), (name, line_len, tail, limit)
                if tail:
                    long_expected = length > 998 or lead + line_len > 998
                    flags = helper.edge(data, 0, line_len, 998)[0]
                    assert bool(flags & helper.LONG_LINE) is long_expected, name


@settings(max_examples=500)
@given(data=blocks)
def test_relax_every_build_equals_python(builds: dict[str, ModuleType], data: bytes) -> None:
    expected = canon._relax_wsp_python(data)
    for name, helper in builds.items():
        assert helper.relax(data) == expected, name
        assert helper.relax(memoryview(data)) == expected, name


def test_relax_returns_the_object_itself_when_nothing_changes(
    builds: dict[str, ModuleType],
) -> None:
    # RFC 6376 §3.4.4: single SPs inside lines stay; a bare CR is line content, the SP before
    # it stays too. The block is handed back as it is, no copy.
    line = b"The quick brown fox \r jumps over the lazy dog.\r\n"
    for helper in builds.values():
        for data in (line * 100, b"", b"x" * 200, line + b" "):
            assert helper.relax(data) is data
            view = memoryview(data)
            assert helper.relax(view) is view


@pytest.mark.parametrize("at", [*range(58, 70), *range(122, 134)])
def test_relax_wsp_runs_and_line_ends_across_blocks(builds: dict[str, ModuleType], at: int) -> None:
    for tail in (b" \r\n", b"\t\r\n", b" \t \r\n", b"  x\r\n", b" \rx\r\n", b"\t \t"):
        data = b"a" * at + tail + b"b c\r\n"
        for name, helper in builds.items():
            assert helper.relax(data) == canon._relax_wsp_python(data), (name, at, tail)


@pytest.mark.parametrize("relaxed", [True, False])
@settings(max_examples=200, deadline=None)
@given(body=blocks, cuts=st.lists(st.integers(0, 250), max_size=6))
def test_streaming_python_and_c_whitespace_agree(
    relaxed: bool, body: bytes, cuts: list[int]
) -> None:
    # The canonicalizer's own streaming path with the pure-Python block function and with the
    # C one (the rest of BodyCanonicalizer is the same code either way).
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]
    kind = Canon.RELAXED if relaxed else Canon.SIMPLE
    outs = []
    for fn in (canon._relax_wsp_python, canon._relax_wsp):
        saved, canon._relax_wsp = canon._relax_wsp, fn
        try:
            out: list[bytes | memoryview] = []
            c = BodyCanonicalizer(kind, out.append)
            for chunk in chunks:
                c.update(chunk)
            c.finish()
        finally:
            canon._relax_wsp = saved
        outs.append(b"".join(out))
    assert outs[0] == outs[1]
