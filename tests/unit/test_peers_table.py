"""mta_peers as the config takes it and as the table decides (peers.py), with a DNS and a
clock of the test's own."""

from __future__ import annotations

import logging
from ipaddress import ip_network

import pytest

from dkim_sidecar.config import Config, ConfigError, parse_config
from dkim_sidecar.milter.address import Listen
from dkim_sidecar.peers import RETRY_SECONDS, MtaPeers, unguarded_listen_warning
from harness.fakes import Clock, FakeDns

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
