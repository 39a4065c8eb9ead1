"""Only the MTAs in `mta_peers` may talk to the milter (peers.py), judged by the connection's
own peer address: config, the table in process, then the real sidecar with clients bound to
loopback addresses, names resolved through a hosts file the test controls, and a real Postfix.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest

from dkim_sidecar.config import Config, ConfigError, parse_config
from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from dkim_sidecar.metrics import Metrics
from dkim_sidecar.milter import codec as p
from dkim_sidecar.milter.address import Listen
from dkim_sidecar.milter.client import MilterClient
from dkim_sidecar.milter.server import MilterServer
from dkim_sidecar.peers import RETRY_SECONDS, MtaGate, MtaPeers, unguarded_listen_warning
from dkim_sidecar.runtime import Controller
from dkim_sidecar.service import milter_options
from dkim_sidecar.session import Session
from harness.dkimcheck import verify_all
from harness.sidecar import Sidecar, dns_table, free_port, wait_for, write_keys

MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: peers\r\n\r\nHello.\r\n"
)
RELAY = "192.0.2.10"  # the client the MTA reports: a relay network, so a peer that may talk
REFUSED = "milter connection refused: the peer is not in mta_peers"


# --- config ------------------------------------------------------------------------------------


def test_mta_peers_take_addresses_networks_and_host_names() -> None:
    config = parse_config(
        {"mta_peers": ["172.22.1.253", "fd4d:6169:6c63:6f77::/64", "Postfix-Mailcow", "x.y"]},
        "c.yml",
        {},
    )
    assert config.mta_peers == (
        ip_network("172.22.1.253/32"),
        ip_network("fd4d:6169:6c63:6f77::/64"),
        "postfix-mailcow",
        "x.y",
    )
    assert Config().mta_peers is None  # unset: any peer, as before


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], "c.yml: mta_peers: is empty: no MTA could connect"),
        ("postfix-mailcow", 'c.yml: mta_peers: "postfix-mailcow" is not a list'),
        (["10.0.0.1/8"], 'c.yml: mta_peers[0]: "10.0.0.1/8" has host bits set'),
        (["ok", "bad name"], 'c.yml: mta_peers[1]: "bad name" is not an IP address, network'),
        (["10.0.0"], 'c.yml: mta_peers[0]: "10.0.0" is not an IP address, network or host name'),
    ],
)
def test_bad_mta_peers_name_the_file_the_key_and_what_was_expected(
    value: object, expected: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"mta_peers": value}, "c.yml", {})
    assert str(e.value).startswith(expected), str(e.value)


@pytest.mark.parametrize(
    ("listen", "peers", "warns"),
    [
        ("inet:0.0.0.0:8891", None, True),
        ("inet6:[::]:8891", None, True),
        ("inet:dkim-sidecar:8891", None, True),
        ("inet:127.0.0.1:8891", None, False),
        ("inet6:[::1]:8891", None, False),
        ("inet:localhost:8891", None, False),
        ("unix:/run/milter.sock", None, False),
        ("inet:0.0.0.0:8891", ("postfix-mailcow",), False),
    ],
)
def test_an_unguarded_listener_is_warned_about(
    listen: str, peers: tuple[str, ...] | None, warns: bool
) -> None:
    warning = unguarded_listen_warning(Config(listen=Listen.parse(listen), mta_peers=peers))
    assert (warning is not None) == warns
    if warning:
        assert listen in warning and "mta_peers" in warning


# --- the table, in process ---------------------------------------------------------------------


class FakeDns:
    def __init__(self, delay: float = 0.0) -> None:
        self.records: dict[str, set[str]] = {}
        self.asked = 0
        self.delay = delay  # a slow DNS answer: the held peer must wait for it, unread

    def __call__(self, name: str) -> set[str]:
        self.asked += 1
        time.sleep(self.delay)
        if name not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.records[name]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unset_mta_peers_allow_any_peer() -> None:
    peers = MtaPeers(None)
    assert peers.allows("203.0.113.9") and peers.allows("::1") and not peers.names


def test_names_keep_their_last_good_addresses_and_failures_are_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns, clock = FakeDns(), Clock()
    peers = MtaPeers(
        [ip_network("10.0.0.0/24"), "postfix-mailcow"], resolver=dns, clock=clock.__call__
    )
    assert peers.allows("10.0.0.7") and not peers.allows("172.22.1.5")
    with caplog.at_level(logging.INFO, logger="dkim_sidecar"):
        peers.resolve()
        peers.resolve()  # still failing: not said again
    assert [r.getMessage() for r in caplog.records].count(
        "an mta_peers name does not resolve; keeping its last addresses"
    ) == 1
    dns.records["postfix-mailcow"] = {"172.22.1.5", "fd4d::5"}
    peers.resolve()
    assert peers.allows("172.22.1.5") and peers.allows("fd4d::5")
    assert peers.allows("::ffff:172.22.1.5")  # an IPv4 peer on a dual-stack socket
    assert not peers.allows("172.22.1.6") and not peers.allows("bogus")
    del dns.records["postfix-mailcow"]  # Docker's DNS has a hiccup: the last addresses stay
    peers.resolve()
    assert peers.allows("172.22.1.5")
    dns.records["postfix-mailcow"] = {"172.22.1.9"}  # the container came back elsewhere
    peers.resolve()
    assert peers.allows("172.22.1.9") and not peers.allows("172.22.1.5")
    assert peers.describe() == "10.0.0.0/24, postfix-mailcow (172.22.1.9)"
    # a reload that keeps the name keeps its addresses until they are resolved again
    again = MtaPeers(["postfix-mailcow"], resolver=dns, previous=peers)
    assert again.allows("172.22.1.9")


def test_an_unknown_peer_may_trigger_a_resolution_at_most_every_retry_interval() -> None:
    dns, clock = FakeDns(), Clock()
    peers = MtaPeers(["postfix-mailcow"], resolver=dns, clock=clock.__call__)
    assert peers.may_retry()
    peers.resolve()  # the periodic resolutions do not count
    assert peers.may_retry()
    peers.retry()
    assert not peers.may_retry() and dns.asked == 2
    clock.now += RETRY_SECONDS - 0.1
    assert not peers.may_retry()
    clock.now += 0.1
    assert peers.may_retry()
    assert not MtaPeers([ip_network("10.0.0.1/32")], resolver=dns).may_retry()  # no names


# --- the server, in process, over real loopback sockets ----------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("keys")
    pem = generate_key(Algorithm.RSA_SHA256, 1024)
    write_keys(d, [("example.com", "s1", pem)])
    return d, dns_table([SigningKey.load("example.com", "s1", pem)])


def _try(address: str, source: str) -> bytes | None:
    """Negotiate and connect from `source`: the connect reply, or None when the milter closed
    the connection before answering anything."""
    try:
        with MilterClient(address, timeout=10, source=source) as c:
            c.negotiate()
            return c.connect(RELAY).encode()
    except (p.ProtocolError, ConnectionError):
        return None


def _flood(port: int, source: str) -> bytes:
    """Send a packet header announcing 1 MB and 8 KB of it; what the milter answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as c:
        try:
            c.sendall(b"\x00\x10\x00\x00" + b"x" * 8192)
            return c.recv(100)
        except ConnectionError:
            return b""


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_an_unknown_peer_is_held_unread_while_the_names_are_resolved_again(
    keys: tuple[Path, dict[str, str]], loop: str
) -> None:
    """A Postfix container re-created with a new address: its first connection waits for one
    resolution (nothing it sends is acted on meanwhile) and is then served, not refused. A
    stranger held the same way gets no answer at all. On both event loops: uvloop reads a
    socket even when reading is paused in connection_made."""
    run = asyncio.run
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        run = uvloop.run
    dns, clock = FakeDns(delay=0.3), Clock()
    config = parse_config(
        {"relay_networks": [RELAY], "mta_peers": ["mta.test"], "keys": {"directory": str(keys[0])}},
        "t",
        {},
    )
    controller = Controller(None, config, Metrics())
    controller.peers = MtaPeers(config.mta_peers, resolver=dns, clock=clock.__call__)
    controller.refresh_keys()  # resolves: nothing yet
    assert dns.asked == 1

    async def scenario() -> tuple[bytes | None, ...]:
        server = MilterServer(
            lambda exact: Session(lambda: controller.current, lambda r: None, exact_headers=exact),
            milter_options(1 << 20),
            MtaGate(lambda: controller.peers, controller.metrics.connections_refused.inc),
        )
        number = free_port()
        await server.start(Listen.parse(f"inet:127.0.0.1:{number}"))
        address = f"inet:127.0.0.1:{number}"
        try:
            # right after a periodic resolution, an unknown peer may still ask for one: held,
            # resolved (nothing yet), refused
            first = await asyncio.to_thread(_try, address, "127.0.0.3")
            asked.append(dns.asked)
            dns.records["mta.test"] = {"127.0.0.3"}
            second = await asyncio.to_thread(_try, address, "127.0.0.3")  # too early: refused
            asked.append(dns.asked)
            clock.now += RETRY_SECONDS
            third = await asyncio.to_thread(_try, address, "127.0.0.3")  # held, resolved, served
            asked.append(dns.asked)
            stranger = await asyncio.to_thread(_try, address, "127.0.0.4")
            asked.append(dns.asked)
            clock.now += RETRY_SECONDS
            held_stranger = await asyncio.to_thread(_try, address, "127.0.0.4")  # held, refused
            asked.append(dns.asked)
            clock.now += RETRY_SECONDS
            # a held peer that streams instead of waiting (a 1 MB length prefix): refused
            # once it has sent more than an MTA would, whatever the resolution says
            flood = await asyncio.to_thread(_flood, number, "127.0.0.6")
            return first, second, third, stranger, held_stranger, flood
        finally:
            await server.close()

    asked: list[int] = []
    first, second, third, stranger, held_stranger, flood = run(scenario())
    assert flood == b""  # closed, nothing answered
    assert (first, second) == (None, None)
    assert third == b"continue"
    assert stranger is None  # refused at once: the interval holds for every peer
    assert held_stranger is None  # no answer while held, then closed
    assert asked == [2, 2, 3, 3, 4]
    assert controller.metrics.connections_refused._value.get() == 5


# --- the real sidecar --------------------------------------------------------------------------


@pytest.fixture
def sidecar_factory(tmp_path: Path, keys: tuple[Path, dict[str, str]]) -> Iterator:
    made: list[Sidecar] = []

    def make(config: dict, **kw) -> Sidecar:
        s = Sidecar(
            tmp_path / f"s{len(made)}",
            {"relay_networks": [RELAY], "keys": {"directory": str(keys[0])}, **config},
            **kw,
        )
        made.append(s)
        return s.start()

    yield make
    for s in made:
        assert s.stop() == 0
        assert "Traceback" not in s.log()


def refused(s: Sidecar) -> float:
    return s.metric("dkim_sidecar_milter_connections_refused_total")


def signed(s: Sidecar) -> float:
    return s.metric("dkim_sidecar_messages_total", outcome="signed", reason="signed")


def test_a_peer_outside_mta_peers_is_closed_at_accept_and_nothing_is_signed(
    sidecar_factory, keys: tuple[Path, dict[str, str]]
) -> None:
    s = sidecar_factory({"mta_peers": ["127.0.0.1"]})
    before = refused(s)
    for _ in range(2):  # whatever the packet claims about the client
        with pytest.raises((p.ProtocolError, ConnectionError)):
            s.send(MESSAGE, client_ip="127.0.0.1", source="127.0.0.2")
    assert refused(s) == before + 2
    assert signed(s) == 0
    # logged with the peer address, once a minute per peer
    s.wait_log(REFUSED)
    assert s.log().count(REFUSED) == 1 and "peer=127.0.0.2" in s.log()
    # the MTA itself is served, and its signature verifies
    r = s.send(MESSAGE, source="127.0.0.1")
    assert r.action == "accept" and len(r.signatures) == 1
    assert verify_all(r.message, keys[1]) == [True]
    assert signed(s) == 1


def _can_unshare_mounts() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(
    not _can_unshare_mounts(), reason="needs root and unshare --mount (a hosts file of its own)"
)
def test_a_name_that_resolves_later_and_a_reload_apply_without_a_restart(
    sidecar_factory, tmp_path: Path
) -> None:
    """The Postfix container's name, not yet known at start (it starts after us), resolves
    later: picked up at the next key refresh. A reload that changes mta_peers applies to the
    next connection."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    s = sidecar_factory(
        {"mta_peers": ["mta.test"], "keys": {"directory": s_keys(tmp_path), "refresh_interval": 1}},
        hosts=hosts,
    )
    s.wait_log("an mta_peers name does not resolve")
    with pytest.raises((p.ProtocolError, ConnectionError)):
        s.send(MESSAGE, source="127.0.0.3")
    with hosts.open("a") as f:  # in place: the bind mount shows this very file
        f.write("127.0.0.3 mta.test\n")
    s.wait_log("mta_peers name resolved")
    assert s.send(MESSAGE, source="127.0.0.3").action == "accept"
    assert signed(s) == 1

    config = dict(s.config, mta_peers=["127.0.0.4"])
    s.write_config(config)
    s.reload()
    with pytest.raises((p.ProtocolError, ConnectionError)):
        s.send(MESSAGE, source="127.0.0.3")
    assert s.send(MESSAGE, source="127.0.0.4").action == "accept"
    assert signed(s) == 2


def test_a_reload_that_narrows_mta_peers_closes_open_connections_of_dropped_peers(
    sidecar_factory,
) -> None:
    """A connection admitted under the old list must not keep asking for signatures."""
    s = sidecar_factory({"mta_peers": ["127.0.0.1", "127.0.0.2"]})
    kept = s.client("127.0.0.1")
    dropped = s.client("127.0.0.2")
    try:
        assert dropped.connect(RELAY) == "continue" and kept.connect(RELAY) == "continue"
        before = refused(s)
        s.write_config(dict(s.config, mta_peers=["127.0.0.1"]))
        s.reload()
        wait_for(lambda: refused(s) == before + 1, 10, "the dropped peer's connection closed")
        with pytest.raises((p.ProtocolError, ConnectionError)):
            dropped.send_message(MESSAGE)
        assert len(kept.send_message(MESSAGE).signatures) == 1
    finally:
        kept.close()
        dropped.close()
    assert signed(s) == 1


def s_keys(tmp_path: Path) -> str:
    """A key directory of the test's own (the refresh re-reads it every second)."""
    d = tmp_path / "keys-own"
    if not d.exists():
        write_keys(d, [("example.com", "s1", generate_key(Algorithm.ED25519_SHA256))])
    return str(d)


def test_dual_stack_listener_serves_ipv4_and_ipv6_peers(sidecar_factory) -> None:
    """inet6:[::]:PORT takes both families on one socket; mta_peers matches the IPv4 peer
    (::ffff:127.0.0.1 on that socket) as IPv4."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    from harness.postfix import has_ipv6_loopback

    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    s = sidecar_factory({"mta_peers": ["127.0.0.1", "::1"]})
    s.stop()
    port = s.port
    s.write_config(dict(s.config, listen=f"inet6:[::]:{port}"))
    s.start()
    for address, source in (
        (f"inet:127.0.0.1:{port}", "127.0.0.1"),
        (f"inet6:[::1]:{port}", "::1"),
    ):
        with MilterClient(address, timeout=10, source=source) as c:
            c.negotiate()
            assert c.connect(RELAY) == "continue"
            assert len(c.send_message(MESSAGE).signatures) == 1
    assert _try(f"inet:127.0.0.2:{port}", "127.0.0.2") is None
    assert "listen=inet6:[::]:" in s.log() and "no IPv6 here" not in s.log()


def test_postfix_still_signs_through_mta_peers(
    sidecar_factory, postfix_factory, keys: tuple[Path, dict[str, str]]
) -> None:
    """A real Postfix connects from 127.0.0.1, the one peer allowed: its relay mail is
    signed, and nothing was refused on the way."""
    s = sidecar_factory({"mta_peers": ["127.0.0.1"], "relay_networks": ["127.0.0.0/8"]})
    before = refused(s)
    postfix = postfix_factory(f"{{ {s.postfix_milter}, default_action=tempfail }}")
    r = postfix.send("alice@example.com", ["bob@example.net"], MESSAGE)
    assert r.ok, (r.code, r.message, postfix.log_tail())
    data = postfix.sink.wait_for(1, timeout=30)[-1].data
    assert verify_all(data, keys[1]) == [True]
    assert refused(s) == before
