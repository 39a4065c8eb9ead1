"""Peer admission in the milter server, in process over real loopback sockets: an unknown
peer is held, unanswered, while the names are resolved again, on uvloop and on asyncio."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from dkim_sidecar.config import parse_config
from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from dkim_sidecar.metrics import Metrics
from dkim_sidecar.milter.address import Listen
from dkim_sidecar.milter.server import MilterServer
from dkim_sidecar.peers import RETRY_SECONDS, MtaGate, MtaPeers
from dkim_sidecar.runtime import Controller
from dkim_sidecar.service import milter_options
from dkim_sidecar.session import Session
from harness.fakes import Clock, FakeDns
from harness.sidecar import dns_table, free_port, milter_reply, write_keys

RELAY = "192.0.2.10"  # the client the MTA reports: a relay network, so a peer that may talk


# --- the server, in process, over real loopback sockets ----------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("keys")
    pem = generate_key(Algorithm.RSA_SHA256, 1024)
    write_keys(d, [("example.com", "s1", pem)])
    return d, dns_table([SigningKey.load("example.com", "s1", pem)])


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
        import uvloop  # a dependency of the sidecar: missing is a failure, not a skip

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

        async def ask(source: str) -> bytes | None:
            return await asyncio.to_thread(milter_reply, address, source, RELAY)

        try:
            # right after a periodic resolution, an unknown peer may still ask for one: held,
            # resolved (nothing yet), refused
            first = await ask("127.0.0.3")
            asked.append(dns.asked)
            dns.records["mta.test"] = {"127.0.0.3"}
            second = await asyncio.to_thread(
                milter_reply, address, "127.0.0.3", RELAY
            )  # too early: refused
            asked.append(dns.asked)
            clock.now += RETRY_SECONDS
            third = await asyncio.to_thread(
                milter_reply, address, "127.0.0.3", RELAY
            )  # held, resolved, served
            asked.append(dns.asked)
            stranger = await ask("127.0.0.4")
            asked.append(dns.asked)
            clock.now += RETRY_SECONDS
            held_stranger = await asyncio.to_thread(
                milter_reply, address, "127.0.0.4", RELAY
            )  # held, refused
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
