"""The commands about keys and config: keys (and --check-dns), check-config, postfix-map,
genkey."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..config import Config, IPNetwork
from ..dkim.keys import Algorithm, SigningKey, check_published, generate_key
from ..keysources.files import write_new_secret
from ..keysources.local import KeySet, SourceUnavailable
from ..relay import mapped_ipv4
from .common import (
    UsageError,
    dns_records,
    load_config_of,
)

# --- keys / check-config ---------------------------------------------------------------------


def load_keys(config: Config) -> tuple[KeySet, list[str]]:
    from ..runtime import make_source

    results = []
    unreachable = []
    for spec in config.keys.sources:
        try:
            results.append(make_source(spec, config, os.environ).load())
        except SourceUnavailable as exc:
            unreachable.append(str(exc))
    return KeySet.combine(results), unreachable


def txt_lookup(
    records: dict[bytes, bytes] | None, resolver: Any = None
) -> Callable[[str], list[bytes]]:
    """name -> every TXT record there (strings joined): from `records` (--record/--records)
    when given, even empty, else from DNS (the system's resolver, or `resolver`, a
    dns.resolver.Resolver). A failed lookup (timeout, SERVFAIL) raises OSError with a
    one-line reason."""
    if records is not None:
        return lambda name: [records[name.encode()]] if name.encode() in records else []
    import dns.exception
    import dns.resolver

    ask = resolver if resolver is not None else dns.resolver

    def lookup(name: str) -> list[bytes]:
        try:
            answer = ask.resolve(name + ".", "TXT", lifetime=5, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            # its text names the server and what it answered (SERVFAIL, REFUSED, a timeout)
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise OSError(f"DNS lookup failed: {detail}") from None
        return [b"".join(r.strings) for r in answer]

    return lookup


def cmd_keys(args: argparse.Namespace) -> int:
    _, config = load_config_of(args.config)
    keys, unreachable = load_keys(config)
    if (args.record or args.records) and not args.check_dns:
        raise UsageError("--record and --records answer the lookups of --check-dns: add it")
    given = dns_records(args) if (args.record or args.records) else None
    lookup = txt_lookup(given) if args.check_dns else None
    bad_dns = unknown_dns = 0
    if not len(keys):
        print("no keys found")
    for domain in sorted(keys.by_domain):
        for k in keys.by_domain[domain]:
            print(f"{k.domain}\t{k.selector}\t{k.algorithm.value}\t{k.bits} bits\t{k.source}")
            print(f'  {k.dns_name} TXT "{k.dns_record()}"')
            if lookup is not None:
                try:
                    ok, why = check_published(k, lookup(k.dns_name))
                except OSError as exc:  # no answer: the record may well be right
                    unknown_dns += 1
                    print(f"  DNS: UNKNOWN: {exc}")
                    continue
                bad_dns += not ok
                print(f"  DNS: {why}" if ok else f"  DNS: WRONG: {why}")
    for line in unreachable:
        print(f"unreachable: {line}", file=sys.stderr)
    for line in keys.problems:
        print(f"unusable: {line}", file=sys.stderr)
    _warn_outside_forwarding_hosts(config, keys)
    if bad_dns:
        print(f"{bad_dns} key(s) without a matching DNS record", file=sys.stderr)
    if unknown_dns:
        print(f"{unknown_dns} key(s) not checked: the DNS lookup failed", file=sys.stderr)
    return 1 if (keys.problems or unreachable or bad_dns or unknown_dns) else 0


def _warn_outside_forwarding_hosts(config: Config, keys: KeySet) -> None:
    from ..keysources.forwarding import forwarding_host_warning, outside_forwarding_hosts

    if keys.forwarding_hosts is None:
        return  # no Mailcow Redis read: nothing known about forwarding hosts
    for network in outside_forwarding_hosts(config.relay_networks, keys.forwarding_hosts):
        print(f"warning: {forwarding_host_warning(network)}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    from ..peers import MtaPeers, unguarded_listen_warning

    path, config = load_config_of(args.config)
    keys, unreachable = load_keys(config)
    problems = [f"unreachable: {u}" for u in unreachable] + [
        f"unusable: {p}" for p in keys.problems
    ]
    for line in problems:
        print(line, file=sys.stderr)
    warning = unguarded_listen_warning(config)
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)
    _warn_outside_forwarding_hosts(config, keys)
    if config.mta_peers is not None:
        peers = MtaPeers(config.mta_peers)
        peers.resolve()  # a name that does not resolve is logged; the sidecar retries it
        print(f"mta_peers: {peers.describe()}")
    print(
        f"{path or '<built-in defaults>'}: config OK; {len(keys)} keys for "
        f"{len(keys.by_domain)} domains" + (f", {len(problems)} problems" if problems else "")
    )
    return 1 if problems else 0


# Mailcow's smtpd_milters, then the sidecar as config/postfix-extra.cf adds it
DEFAULT_MAP_MILTERS = (
    "inet:rspamd:9900, { inet:dkim-sidecar:8891, default_action=accept, connect_timeout=10s, "
    "command_timeout=30s, content_timeout=300s }"
)


def milter_map_lines(networks: Sequence[IPNetwork], milters: str) -> list[str]:
    """A Postfix CIDR table for smtpd_milter_maps: each relay network gets `milters`; other
    clients keep smtpd_milters and never reach the sidecar. Postfix shows an IPv4-mapped
    client (::ffff:a.b.c.d) as IPv4, so mapped networks are written as IPv4 ones."""
    lines, seen = [], set()
    for net in networks:
        if isinstance(net, ipaddress.IPv6Network):
            net = mapped_ipv4(net) or net
        if net not in seen:
            seen.add(net)
            lines.append(f"{net}\t{milters}")
    return lines


def cmd_postfix_map(args: argparse.Namespace) -> int:
    _, config = load_config_of(args.config)
    keys, unreachable = load_keys(config)
    networks = [*config.relay_networks, *keys.networks]
    print(
        "# smtpd_milter_maps table from dkim-sidecar's relay networks"
        + (" and Mailcow's forwarding hosts" if keys.networks else "")
        + "\n# regenerate after changing them: dkim-sidecar postfix-map > this file"
    )
    for line in milter_map_lines(networks, args.milters):
        print(line)
    for line in unreachable:
        print(f"unreachable (its networks are missing above): {line}", file=sys.stderr)
    return 1 if unreachable else 0


def cmd_genkey(args: argparse.Namespace) -> int:
    algorithm = Algorithm.ED25519_SHA256 if args.algorithm == "ed25519" else Algorithm.RSA_SHA256
    pem = generate_key(algorithm, args.bits)
    key = SigningKey.load(args.domain, args.selector, pem)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{key.domain}.{key.selector}.key")
    try:
        write_new_secret(path, pem)
    except FileExistsError:
        raise UsageError(f"{path} exists; not overwritten") from None
    print(f"wrote {path}")
    print(f'{key.dns_name}. IN TXT "{key.dns_record()}"')
    return 0
