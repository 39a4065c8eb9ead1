"""Every build of the C helper against the pure-Python path: the one installed here, and three
compiled from the source by the tests: the default one (on x86-64 AVX2 when the CPU has it,
else SSE2), the SSE2 one (DKIM_SCAN_NO_AVX2) and the portable SWAR one that arm64 gets
(DKIM_SCAN_PORTABLE). All must give the answers of `_relax_wsp_python` and of the slow
reference below, at every position against their 64-octet blocks."""

from __future__ import annotations

import importlib.util
import itertools
import platform
import shutil
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dkim_sidecar.dkim import canon
from dkim_sidecar.dkim.canon import BodyCanonicalizer, Canon
from harness.skips import machine_cannot

SOURCE = Path(canon.__file__).with_name("_scan.c")


def _compiler() -> str | None:
    return shutil.which(sysconfig.get_config_var("CC").split()[0] or "cc") or shutil.which("cc")


def _build(cc: str, tmp: Path, define: str | None) -> ModuleType:
    target = tmp / ("_scan" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cc, "-O2", "-fPIC", "-shared", *([f"-D{define}"] if define else [])]
    cmd += ["-I", sysconfig.get_paths()["include"], str(SOURCE), "-o", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    spec = importlib.util.spec_from_file_location("dkim_sidecar.dkim._scan", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the builds compiled from the source here, by their -D flag (None: the default build)
DEFINES = {"default": None, "no_avx2": "DKIM_SCAN_NO_AVX2", "portable": "DKIM_SCAN_PORTABLE"}


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    """Each build by its name: "installed" (the .so in the package, which may be older than
    the source) and the DEFINES compiled from _scan.c now."""
    cc = _compiler()
    if cc is None:  # `make test` installs gcc
        pytest.skip("no C compiler (cc) on PATH, which `make test` installs: _scan.c unchecked")
    found: dict[str, ModuleType] = {}
    if canon.scan_helper is not None:  # its absence fails test_scan.py
        found["installed"] = canon.scan_helper
    for name, define in DEFINES.items():
        found[name] = _build(cc, tmp_path_factory.mktemp(name), define)
    return found


def _cpu_has_avx2() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "avx2" in line.split() for line in cpuinfo.splitlines())


def test_the_builds_are_the_expected_ones(builds: dict[str, ModuleType]) -> None:
    simd = {name: builds[name].SIMD for name in DEFINES}
    if platform.machine() in ("x86_64", "AMD64"):
        default = "avx2" if _cpu_has_avx2() else "sse2"
        assert simd == {"default": default, "no_avx2": "sse2", "portable": "swar"}
    else:
        assert set(simd.values()) == {"swar"}


def test_this_machine_runs_every_simd_path(builds: dict[str, ModuleType]) -> None:
    """The tests here run each build's code on this CPU: the SSE2 and AVX2 paths only on an
    x86-64 one, the AVX2 path only when the CPU has AVX2. Say so when one went unchecked."""
    if platform.machine() not in ("x86_64", "AMD64"):
        machine_cannot(f"run the x86-64 SIMD code of _scan.c on {platform.machine()}: unchecked")
    if not _cpu_has_avx2():
        machine_cannot("run the AVX2 code of _scan.c (no avx2 in /proc/cpuinfo): unchecked")
    assert builds["default"].SIMD == "avx2"


# filler before the interesting octets moves them across the 8- and 64-octet boundaries
pieces = st.lists(
    st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b" \r\n", b"  ", b"a", b"\x00", b"\xff"]),
    max_size=30,
).map(b"".join)
blocks = st.builds(
    lambda k, body, m: b"x" * k + body + b"y" * m, st.integers(0, 140), pieces, st.integers(0, 70)
)


# long stretches between line ends: lines over the limit inside the data, LF-free blocks
long_lines = st.lists(
    st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b"x" * 300, b"y" * 699]), max_size=12
).map(b"".join)


def reference_edge(
    helper: ModuleType, data: bytes, prev: int, line_len: int, limit: int
) -> tuple[int, int]:
    """edge()'s answer, the slow way: BARE_LF for an LF after anything but CR (prev before
    data), LONG_LINE for a line of more than limit + 1 octets before its LF (a CR is taken as
    one of them) or an open line as long; and the length of the line open at the end."""
    flags = 0
    for i, c in enumerate(data):
        if c == 10 and (data[i - 1] if i else prev) != 13:
            flags |= helper.BARE_LF
    lines = data.split(b"\n")
    lengths = [line_len + len(lines[0]), *(len(p) for p in lines[1:])]
    if any(n > limit + 1 for n in lengths):
        flags |= helper.LONG_LINE
    return flags, lengths[-1]


# 998: the product's limit; 63 and 62: the smallest that the SIMD edge takes (a line cannot
# pass it inside one block) and the largest that goes to the word-at-a-time loop instead
@settings(max_examples=400)
@given(
    data=st.one_of(blocks, long_lines),
    prev=st.sampled_from([0, 13, 32, 97]),
    line_len=st.integers(0, 1100),
    limit=st.sampled_from([998, 63, 62, 40]),
)
def test_edge_every_build(
    builds: dict[str, ModuleType], data: bytes, prev: int, line_len: int, limit: int
) -> None:
    for name, helper in builds.items():
        expected = reference_edge(helper, data, prev, line_len, limit)
        assert helper.edge(data, prev, line_len, limit) == expected, name


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
                for limit in (998, 63, 62, 40):  # under 63: the word-at-a-time loop
                    expected = reference_edge(helper, data, 0, line_len, limit)
                    got = helper.edge(data, 0, line_len, limit)
                    assert got == expected, (name, line_len, tail, limit)
                if tail:
                    long_expected = length > 998 or lead + line_len > 998
                    flags = helper.edge(data, 0, line_len, 998)[0]
                    assert bool(flags & helper.LONG_LINE) is long_expected, name


@pytest.mark.parametrize("limit", [998, 40])
def test_a_cr_ending_the_chunk_before_pairs_with_a_leading_lf(
    builds: dict[str, ModuleType], limit: int
) -> None:
    for name, helper in builds.items():
        for data in (b"\n", b"\nx\r\n", b"\n" + b"x" * 200 + b"\r\n"):
            assert not helper.edge(data, 13, 3, limit)[0] & helper.BARE_LF, (name, data)
            for prev in (0, 10, 32, 97):  # 0: nothing before, the body starts here
                assert helper.edge(data, prev, 3, limit)[0] & helper.BARE_LF, (name, prev)


@pytest.mark.parametrize("limit", [40, 62])
def test_short_limits_measure_each_line_inside_a_block(
    builds: dict[str, ModuleType], limit: int
) -> None:
    # Under 63 octets a whole line, LF to LF, fits in one 64-octet block: each line is measured
    # on its own, whatever the block holds before and after it.
    for lead in range(70):
        for n in (limit - 1, limit, limit + 1):
            data = b"a" * lead + b"\r\n" + b"b" * n + b"\r\nc\r\n"
            for name, helper in builds.items():
                expected = reference_edge(helper, data, 0, 0, limit)
                assert helper.edge(data, 0, 0, limit) == expected, (name, lead, n)
                if lead <= limit:
                    assert bool(expected[0] & helper.LONG_LINE) is (n > limit)


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
    # (a whole block after the tail: one without a candidate of its own is copied as it is,
    # unless a WSP run from the block before goes on into it)
    for tail in (b" \r\n", b"\t\r\n", b" \t \r\n", b"  x\r\n", b" \rx\r\n", b"\t \t", b"\t x"):
        data = b"a" * at + tail + b"b c\r\n" + b"d" * 64
        for name, helper in builds.items():
            assert helper.relax(data) == canon._relax_wsp_python(data), (name, at, tail)


@settings(max_examples=200)
@given(body=blocks, cuts=st.lists(st.integers(0, 250), max_size=6))
def test_streaming_python_and_c_whitespace_agree(
    builds: dict[str, ModuleType], body: bytes, cuts: list[int]
) -> None:
    # The relaxed canonicalizer's own streaming path with the pure-Python block function and
    # with each build's relax() (the rest of BodyCanonicalizer is the same code either way;
    # simple canonicalization calls neither).
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]

    def canonical(relax: Callable[[canon.Block], canon.Block]) -> bytes:
        saved, canon._relax_wsp = canon._relax_wsp, relax
        try:
            out: list[bytes | memoryview] = []
            c = BodyCanonicalizer(Canon.RELAXED, out.append)
            for chunk in chunks:
                c.update(chunk)
            c.finish()
        finally:
            canon._relax_wsp = saved
        return b"".join(out)

    expected = canonical(canon._relax_wsp_python)
    for name, helper in builds.items():
        assert canonical(helper.relax) == expected, name
