"""The milter server's reading and framing (milter/connection.py), in process: the packet
stream an MTA sends, cut into reads of any size the way asyncio hands them over (get_buffer,
recv_into, buffer_updated), must give the same replies as the stream read whole, and a
signature that dkimpy verifies. The sockets themselves are covered by the tests that run the
sidecar."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dkim_sidecar.config import parse_config
from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from dkim_sidecar.metrics import Metrics
from dkim_sidecar.milter import codec as p
from dkim_sidecar.milter.client import Result, apply_changes, split_header
from dkim_sidecar.milter.connection import MilterConnection
from dkim_sidecar.milter.server import MilterServer
from dkim_sidecar.runtime import Controller
from dkim_sidecar.service import milter_options
from dkim_sidecar.session import Session
from harness.dkimcheck import verify_all
from harness.sidecar import dns_table, write_keys

RELAY = "192.0.2.10"
BIG = b"x" * 300_000  # one header packet larger than the largest read buffer


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[MilterServer, dict[str, str]]:
    work = tmp_path_factory.mktemp("server")
    pem = generate_key(Algorithm.ED25519_SHA256)
    write_keys(work / "keys", [("example.com", "s1", pem)])
    config = parse_config(
        {"relay_networks": ["192.0.2.0/24"], "keys": {"directory": str(work / "keys")}}, "t", {}
    )
    controller = Controller(None, config, Metrics())
    controller.refresh_keys()
    server = MilterServer(
        lambda exact: Session(lambda: controller.current, lambda r: None, exact_headers=exact),
        milter_options(2 << 20),
    )
    return server, dns_table([SigningKey.load("example.com", "s1", pem)])


def message(body_kb: int) -> bytes:
    body = b"".join(b"line %d of the body, with  two spaces \r\n" % i for i in range(body_kb * 25))
    return (
        b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: hi\r\n"
        b"X-Big: " + BIG + b"\r\n\r\n" + body
    )


def stream(msg: bytes) -> bytes:
    fields, body = split_header(msg)
    out = [
        p.packet(b"O", struct.pack("!III", 6, p.ALL_ACTIONS, p.ALL_PROTOCOL)),
        p.packet(b"D", b"Cj\0mx.example\0"),
        p.packet(b"C", b"relay\0" + b"4" + struct.pack("!H", 25) + RELAY.encode() + b"\0"),
        p.packet(b"D", b"M{auth_authen}\0\0"),
        p.packet(b"M", b"<alice@example.com>\0"),
        p.packet(b"T"),
        *(p.packet(b"L", name + b"\0" + value + b"\0") for name, value in fields),
        p.packet(b"D", b"Ni\0Q1\0"),
        p.packet(b"N"),
        *(p.packet(b"B", body[i : i + p.CHUNK]) for i in range(0, len(body), p.CHUNK)),
        p.packet(b"E"),
    ]
    return b"".join(out)


def feed(server: MilterServer, data: bytes, cuts: list[int]) -> FakeTransport:
    """Hand `data` over as asyncio's selector loop does: each read fills at most the buffer
    the protocol offers; `cuts` are the sizes the kernel happens to return."""
    conn = MilterConnection(server)
    transport = FakeTransport()
    conn.connection_made(transport)
    pos, i = 0, 0
    while pos < len(data):
        buf = conn.get_buffer(-1)
        assert len(buf) > 0
        want = cuts[i % len(cuts)] if cuts else len(data)
        n = min(want, len(buf), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        del buf  # as asyncio's read loop lets go of it
        conn.buffer_updated(n)
        pos, i = pos + n, i + 1
    conn.connection_lost(None)
    return transport


def replies(out: bytes) -> list[tuple[bytes, bytes]]:
    got, pos = [], 0
    while pos < len(out):
        (size,) = struct.unpack_from("!I", out, pos)
        got.append((out[pos + 4 : pos + 5], out[pos + 5 : pos + 4 + size]))
        pos += 4 + size
    return got


def signed(msg: bytes, out: bytes) -> bytes:
    result = Result("accept", "eom")
    for cmd, data in replies(out):
        if cmd == p.R_INSHEADER:
            result.inserted.append(p.parse_insert_header(data))
    return apply_changes(msg, result, leadspc=True)


@settings(max_examples=40)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=8),
    body_kb=st.sampled_from([0, 3, 200]),
)
def test_any_cut_of_the_stream_gives_the_same_replies(setup, cuts: list[int], body_kb: int):
    server, dns = setup
    msg = message(body_kb)
    data = stream(msg)
    whole = feed(server, data, [])
    cut = feed(server, data, cuts)
    commands = [c for c, _ in replies(bytes(cut.out))]
    assert commands == [c for c, _ in replies(bytes(whole.out))]
    # negotiation, connect, DATA, then the insertion and accept; MAIL, header, end of header
    # and body have no reply (SMFIP_NR_*)
    assert commands == [b"O", b"c", b"c", b"i", b"a"]
    assert verify_all(signed(msg, bytes(cut.out)), dns) == [True]
    assert not cut.closed


def test_one_octet_at_a_time(setup) -> None:
    server, dns = setup
    msg = message(0).replace(BIG, b"small")
    out = bytes(feed(server, stream(msg), [1]).out)
    assert verify_all(signed(msg, out), dns) == [True]


def test_a_packet_over_the_limit_closes_without_a_reply(setup) -> None:
    server, _ = setup
    data = p.packet(b"O", struct.pack("!III", 6, p.ALL_ACTIONS, p.ALL_PROTOCOL))
    data += struct.pack("!I", server.options.max_packet + 1) + b"L"
    t = feed(server, data, [7])
    assert [c for c, _ in replies(bytes(t.out))] == [b"O"] and t.closed


def test_the_buffer_shrinks_after_a_huge_packet(setup, tmp_path: Path) -> None:
    server, _ = setup
    conn = MilterConnection(server)
    conn.connection_made(FakeTransport())
    data = p.packet(b"D", b"M" + b"x\0" + b"y" * 600_000 + b"\0") + p.packet(b"A")
    pos = 0
    while pos < len(data):
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        del buf
        conn.buffer_updated(n)
        pos += n
    assert len(conn._buf) <= 256 * 1024


def test_a_connection_leaves_no_reference_cycle(setup) -> None:
    """Everything a connection and its message allocate is freed by reference counting as
    soon as it closes: garbage that only the cyclic collector can free piles up between its
    rare full runs (the soak test saw RSS creep that way)."""
    import gc

    server, _ = setup
    msg = message(3).replace(BIG, b"small")
    data = stream(msg)
    feed(server, data, [4096])  # warm up caches (From parsing, folds, metric children)
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            feed(server, data, [4096])
        assert gc.collect() == 0
    finally:
        gc.enable()
