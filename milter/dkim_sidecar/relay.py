"""Which clients are relay clients: relay networks as a table built once per snapshot, so that
the check at connect and MAIL parses nothing but the client address."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

IPNetwork = IPv4Network | IPv6Network

_MAPPED_V4 = IPv6Network("::ffff:0:0/96")
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def mapped_ipv4(net: IPv6Network) -> IPv4Network | None:
    """The IPv4 network that an IPv4-mapped one (::ffff:a.b.c.d/n, n ≥ 96) stands for, else
    None. Postfix reports such a client as IPv4, and is_relay matches it so."""
    if not net.subnet_of(_MAPPED_V4):
        return None
    return IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))


@dataclass(frozen=True)
class RelayTable:
    """Relay networks as (network, mask) integers per address family, built once per config
    or snapshot, so that the check at connect and MAIL parses nothing but the client address."""

    v4: tuple[tuple[int, int], ...]
    v6: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, networks: Iterable[IPNetwork]) -> RelayTable:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for net in networks:
            if isinstance(net, IPv4Network):
                v4.append((int(net.network_address), int(net.netmask)))
                continue
            v6.append((int(net.network_address), int(net.netmask)))
            mapped = mapped_ipv4(net)
            if mapped is not None:  # ::ffff:a.b.c.d/n also matches the IPv4 client a.b.c.d
                v4.append((int(mapped.network_address), int(mapped.netmask)))
        return cls(tuple(v4), tuple(v6))

    def contains(self, ip: str) -> bool:
        """Is this client address in one of the networks? An IPv4-mapped IPv6 address
        (::ffff:a.b.c.d) is matched as IPv4; anything that is not an address gives False."""
        # inet_pton is strict (dotted quad, RFC 4291 text) and ~20 times faster than ipaddress
        try:
            if ":" in ip:
                packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
                if packed[:12] == _MAPPED_PREFIX:
                    table, value = self.v4, int.from_bytes(packed[12:])
                else:
                    table, value = self.v6, int.from_bytes(packed)
            else:
                table, value = self.v4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip))
        except (OSError, TypeError, ValueError):
            return False
        return any(value & mask == net for net, mask in table)
