"""Mailcow's forwarding hosts: as relay networks, as what rspamd whitelists, and the relay
networks none of them covers. Mailcow's UI stores them so
(`data/web/inc/functions.fwdhost.inc.php`):

    WHITELISTED_FWD_HOST  <IP or CIDR> -> what the admin typed: the same IP or CIDR, or a host
                                          name that Mailcow expanded into that domain's outgoing
                                          networks (`get_outgoing_hosts_best_guess`: its SPF,
                                          MX or A/AAAA addresses), one field each
    KEEP_SPAM             <IP or CIDR> -> "1" when the spam filter is off for that host

Only a field whose value is its own IP or CIDR becomes a relay network: a host the admin runs.
The networks expanded from a name are someone else's (typing `gmail.com` stores Google's
outgoing ranges): every user of that provider could have mail signed as ours.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Literal

from ..relay import mapped_ipv4
from .local import Network

__all__ = [
    "FWD_HOSTS_HASH",
    "KEEP_SPAM_HASH",
    "NetworksFrom",
    "forwarding_host_warning",
    "name_text",
    "outside_forwarding_hosts",
    "parse_network",
    "relay_networks",
    "whitelisted",
]

NetworksFrom = Literal["keep_spam", "forwarding_hosts"]

FWD_HOSTS_HASH = "WHITELISTED_FWD_HOST"
KEEP_SPAM_HASH = "KEEP_SPAM"


# The shortest prefix a forwarding host may have to be taken as a relay network, per IP
# version: a /8 (IPv4) or a /16 (IPv6) at the widest.
_MIN_PREFIXLEN = {4: 8, 6: 16}


def parse_network(text: str) -> tuple[Network, bool]:
    """An IP address or CIDR as Mailcow stores a forwarding host; a bare address is a /32 or
    /128. The flag says whether host bits were set (`192.0.2.7/24`): the network is then the
    enclosing one, as Mailcow's own match (`in_net` in `dynmaps/forwardinghosts.php`) and
    rspamd's maps read it. ValueError for anything else (a host name).
    """
    text = text.strip()
    if "/" not in text:
        return ipaddress.ip_network(ipaddress.ip_address(text)), False
    network = ipaddress.ip_network(text, strict=False)
    address = ipaddress.ip_address(text.split("/", 1)[0])
    return network, address != network.network_address


def relay_networks(
    fwd_hosts: dict[bytes, bytes],
    keep_spam: dict[bytes, bytes],
    networks_from: NetworksFrom | None,
    where: str,
    problems: list[str],
) -> list[Network]:
    """The forwarding hosts that become relay networks (all of them, or those with the spam
    filter off), each typed as its own IP or network; the others are added to `problems`."""
    if networks_from == "forwarding_hosts":
        hosts: Iterable[bytes] = fwd_hosts
        what = FWD_HOSTS_HASH
    else:
        hosts = []
        for host, value in keep_spam.items():
            if value.strip() != b"1":
                continue  # Mailcow writes "1" and deletes the field when the filter is on
            if host not in fwd_hosts:
                # Mailcow deletes both fields together; a KEEP_SPAM field on its own is a
                # leftover of a manual edit, and is no reason to trust a network
                problems.append(
                    f"{where}: {KEEP_SPAM_HASH} entry {name_text(host)!r} is not a forwarding "
                    f"host in {FWD_HOSTS_HASH}; skipped"
                )
                continue
            hosts.append(host)
        what = KEEP_SPAM_HASH
    found: dict[Network, None] = {}
    expanded: dict[str, list[str]] = {}  # typed name -> the networks Mailcow stored for it
    for host in sorted(hosts):
        text = name_text(host)
        typed = name_text(fwd_hosts.get(host, b"")).strip()
        if typed != text.strip():
            expanded.setdefault(typed, []).append(text)
            continue
        try:
            network, widened = parse_network(text)
        except ValueError:
            problems.append(
                f"{where}: {what} entry {text!r} is not an IP address or network (a host "
                "name?); skipped"
            )
            continue
        if network.prefixlen < _MIN_PREFIXLEN[network.version]:
            # a typo ("/0", "/3") would let any client on the Internet get signatures
            problems.append(
                f"{where}: {what} entry {text!r} is {network}, wider than a /"
                f"{_MIN_PREFIXLEN[network.version]}: not trusted to relay; skipped"
            )
            continue
        if widened:
            # said out loud: a typo in the prefix length lets a whole network relay
            problems.append(
                f"{where}: {what} entry {text!r} has host bits set; using {network}, as "
                "Mailcow does"
            )
        found[network] = None
    for typed, networks in sorted(expanded.items()):
        problems.append(
            f"{where}: {what} entries {', '.join(networks)} were expanded by Mailcow from "
            f"the host name {typed!r}: another domain's networks, not hosts you run; "
            "skipped (add a relay host as its IP address or network)"
        )
    return sorted(found, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


def whitelisted(fwd_hosts: dict[bytes, bytes] | None) -> tuple[Network, ...] | None:
    """Every forwarding-host network as rspamd's WHITELISTED_FWD_HOST map reads the hash: all
    its fields, typed as a network or expanded from a name alike."""
    if fwd_hosts is None:
        return None
    found = []
    for host in fwd_hosts:
        try:
            found.append(parse_network(name_text(host))[0])
        except ValueError:
            continue  # not a network: rspamd's map skips it too
    return tuple(found)


def name_text(raw: bytes) -> str:
    """A name or host as stored in a Redis hash, for a check or a problem line: a bad byte
    shows as U+FFFD (and then fails the name check with a readable line)."""
    return raw.decode("utf-8", "replace")


def outside_forwarding_hosts(
    relay_networks: Iterable[Network], forwarding_hosts: Iterable[Network]
) -> list[Network]:
    """The relay networks that no Mailcow forwarding host covers whole. Mailcow's rspamd sees
    such a client as an unauthenticated stranger: mail it sends with From: a Mailcow domain
    whose SPF does not pass for it is rejected (SPOOFED_UNAUTH) before the sidecar is asked.
    (Whether SPF passes takes DNS: not checked here, the warning says so.) Loopback is
    Postfix's own container, never such a client; IPv4-mapped networks count as IPv4."""
    hosts = [_plain(h) for h in forwarding_hosts]
    outside = []
    for net in relay_networks:
        plain = _plain(net)
        if plain.is_loopback:
            continue
        if not any(plain.version == h.version and _within(plain, h) for h in hosts):
            outside.append(net)
    return outside


def _plain(net: Network) -> Network:
    """::ffff:a.b.c.d/n as the IPv4 network it maps (Postfix reports such clients as IPv4)."""
    if isinstance(net, ipaddress.IPv6Network):
        return mapped_ipv4(net) or net
    return net


def _within(net: Network, outer: Network) -> bool:
    """net.subnet_of(outer) for two networks of one family, spelled so a type checker sees it."""
    return net.prefixlen >= outer.prefixlen and (
        int(net.network_address) & int(outer.netmask) == int(outer.network_address)
    )


def forwarding_host_warning(network: Network) -> str:
    return (
        f"relay network {network} is not a Mailcow forwarding host: rspamd will reject its mail "
        "with From: a Mailcow domain (SPOOFED_UNAUTH) before the sidecar signs it, unless that "
        "domain's SPF record lists it; add it in Mailcow (System > Configuration > Options > "
        "Forwarding Hosts)"
    )
