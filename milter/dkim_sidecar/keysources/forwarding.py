"""Mailcow's forwarding hosts, as relay networks and as what rspamd whitelists. Mailcow's UI
stores them so (`data/web/inc/functions.fwdhost.inc.php`):

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

from .local import Network

__all__ = [
    "FWD_HOSTS_HASH",
    "KEEP_SPAM_HASH",
    "NetworksFrom",
    "name_text",
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
