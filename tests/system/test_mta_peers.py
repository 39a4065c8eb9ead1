"""Only the MTAs in `mta_peers` may talk to the milter: the real sidecar, with clients bound to
loopback addresses, names resolved through a hosts file the test controls, reloads, both
address families on one socket, and a real Postfix."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from dkim_sidecar.milter import codec as p
from dkim_sidecar.milter.client import MilterClient
from harness import skips
from harness.dkimcheck import verify_all
from harness.postfix import has_ipv6_loopback
from harness.sidecar import Sidecar, dns_table, milter_reply, wait_for, write_keys

MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: peers\r\n\r\nHello.\r\n"
)
RELAY = "192.0.2.10"  # the client the MTA reports: a relay network, so a peer that may talk
REFUSED = "milter connection refused: the peer is not in mta_peers"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("keys")
    pem = generate_key(Algorithm.RSA_SHA256, 1024)
    write_keys(d, [("example.com", "s1", pem)])
    return d, dns_table([SigningKey.load("example.com", "s1", pem)])


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


def _unshare_mounts_or_skip() -> None:
    """The sidecar gets a hosts file of its own in a mount namespace. make test runs as root
    and util-linux brings unshare: only a kernel that refuses the namespace (an unprivileged
    container) is a reason to skip."""
    if os.geteuid() != 0:
        pytest.fail("needs root (make test runs as root): unshare --mount for a hosts file")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        skips.machine_cannot(
            f"make a mount namespace (unshare --mount true: {probe.stderr.decode().strip()})"
        )


def _signed_here(s: Sidecar, source: str, dns: dict[str, str]) -> None:
    r = s.send(MESSAGE, source=source)
    assert r.action == "accept" and verify_all(r.message, dns) == [True]


def _refused_here(s: Sidecar, source: str) -> None:
    """Closed unanswered, and counted as refused: not merely a sidecar that is not there."""
    before = refused(s)
    with pytest.raises((p.ProtocolError, ConnectionError)):
        s.send(MESSAGE, source=source)
    wait_for(lambda: refused(s) == before + 1, 60, f"the refusal of {source}")


def test_a_name_that_resolves_later_and_a_reload_apply_without_a_restart(
    sidecar_factory, tmp_path: Path
) -> None:
    """The Postfix container's name, not yet known at start (it starts after us), resolves
    later: picked up at the next key refresh. A reload that changes mta_peers applies to the
    next connection."""
    _unshare_mounts_or_skip()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    keys_dir, dns = s_keys(tmp_path)
    s = sidecar_factory(
        {"mta_peers": ["mta.test"], "keys": {"directory": keys_dir, "refresh_interval": 1}},
        hosts=hosts,
    )
    s.wait_log("an mta_peers name does not resolve")
    _refused_here(s, "127.0.0.3")
    with hosts.open("a") as f:  # in place: the bind mount shows this very file
        f.write("127.0.0.3 mta.test\n")
    s.wait_log("mta_peers name resolved")
    _signed_here(s, "127.0.0.3", dns)

    config = dict(s.config, mta_peers=["127.0.0.4"])
    s.write_config(config)
    s.reload()
    _refused_here(s, "127.0.0.3")
    _signed_here(s, "127.0.0.4", dns)
    assert signed(s) == 2


def test_a_reload_that_narrows_mta_peers_closes_open_connections_of_dropped_peers(
    sidecar_factory, keys: tuple[Path, dict[str, str]]
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
        wait_for(lambda: refused(s) == before + 1, 60, "the dropped peer's connection closed")
        with pytest.raises((p.ProtocolError, ConnectionError)):
            dropped.send_message(MESSAGE)
        assert verify_all(kept.send_message(MESSAGE).message, keys[1]) == [True]
    finally:
        kept.close()
        dropped.close()
    assert signed(s) == 1


def s_keys(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A key directory of the test's own (the refresh re-reads it every second), and its DNS."""
    d = tmp_path / "keys-own"
    pem = generate_key(Algorithm.ED25519_SHA256)
    write_keys(d, [("example.com", "s1", pem)])
    return str(d), dns_table([SigningKey.load("example.com", "s1", pem)])


def test_dual_stack_listener_serves_ipv4_and_ipv6_peers(
    sidecar_factory, keys: tuple[Path, dict[str, str]]
) -> None:
    """inet6:[::]:PORT takes both families on one socket; mta_peers matches the IPv4 peer
    (::ffff:127.0.0.1 on that socket) as IPv4."""
    if not has_ipv6_loopback():
        skips.machine_cannot("bind ::1 (no IPv6 loopback)")
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
            assert verify_all(c.send_message(MESSAGE).message, keys[1]) == [True]
    before = refused(s)
    assert milter_reply(f"inet:127.0.0.2:{port}", "127.0.0.2", RELAY) is None
    wait_for(lambda: refused(s) == before + 1, 60, "the refusal of 127.0.0.2")
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
