"""Which relay networks no Mailcow forwarding host covers (keysources/forwarding.py): the
ones whose mail Mailcow's rspamd rejects as spoofed before the sidecar is asked."""

from __future__ import annotations

from ipaddress import ip_network

from dkim_sidecar.keysources.forwarding import outside_forwarding_hosts


def test_relay_networks_outside_forwarding_hosts_are_those_no_host_covers_whole() -> None:
    hosts = [ip_network(n) for n in ("192.0.2.0/24", "2001:db8::/32", "::ffff:203.0.113.0/120")]
    relay = [
        ip_network(n)
        for n in (
            "192.0.2.128/25",  # inside
            "192.0.2.0/23",  # wider than the host: part of it is not whitelisted
            "198.51.100.1/32",  # outside
            "2001:db8:5::/48",  # inside
            "2001:db9::/48",  # outside
            "127.0.0.0/8",  # loopback: Postfix's own container
            "::1/128",
            "::ffff:127.0.0.0/104",
            "::ffff:192.0.2.0/120",  # IPv4-mapped: inside, as Postfix reports such clients
            "203.0.113.5/32",  # inside a forwarding host written IPv4-mapped
        )
    ]
    assert [str(n) for n in outside_forwarding_hosts(relay, hosts)] == [
        "192.0.2.0/23",
        "198.51.100.1/32",
        "2001:db9::/48",
    ]
    assert outside_forwarding_hosts(relay[:1], []) == relay[:1]
