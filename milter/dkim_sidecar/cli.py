"""The `dkim-sidecar` command: run the milter, sign and verify offline, inspect keys and config.

Every user error ends in one clear line and exit status 2 (1 where a check failed), never a
traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .config import Config, ConfigError, IPNetwork, load_config, mapped_ipv4
from .dkim.canon import Canonicalization
from .dkim.header import split_message, with_body_separator
from .dkim.keys import Algorithm, KeyLoadError, SigningKey, check_published, generate_key
from .dkim.signer import MessageSigner, SigningPolicy
from .keysources.files import write_new_secret
from .keysources.local import KeySet, SourceUnavailable

DEFAULT_CONFIG = "/etc/dkim-sidecar/config.yml"


class UsageError(Exception):
    """A problem the user can fix; the text is the whole message."""


def to_crlf(data: bytes) -> bytes:
    """Any mix of LF and CRLF line ends as CRLF (the core takes CRLF only)."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def _config_path(arg: str | None) -> str | None:
    """--config, else $DKIM_SIDECAR_CONFIG, else the default path if it exists, else None
    (the built-in defaults)."""
    if arg:
        return arg
    env = os.environ.get("DKIM_SIDECAR_CONFIG")
    if env:
        return env
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def _load(arg: str | None) -> tuple[str | None, Config]:
    path = _config_path(arg)
    return path, load_config(path)


# --- run -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .service import Service

    path, config = _load(args.config)
    setup_logging(config.log_format.value, config.log_level.level)
    return Service(path, config).run()


# --- sign / verify ---------------------------------------------------------------------------


def cmd_sign(args: argparse.Namespace) -> int:
    selectors = args.selector or []
    key_files = args.key or []
    if len(selectors) != len(key_files):
        raise UsageError(f"{len(key_files)} --key but {len(selectors)} --selector: give one each")
    keys = []
    for selector, key_file in zip(selectors, key_files, strict=True):
        keys.append(SigningKey.load(args.domain, selector, _read(key_file), key_file))
    try:
        canon = Canonicalization.parse(args.canon)
    except ValueError as exc:
        raise UsageError(f"--canon: {exc}") from None
    config = Config()
    headers = _names(args.headers) if args.headers else config.sign_headers
    oversign = _names(args.oversign) if args.oversign is not None else config.oversign_headers
    try:
        policy = SigningPolicy(canon, headers, frozenset(oversign), args.expire)
    except ValueError as exc:
        raise UsageError(f"--headers: {exc}") from None
    message, inserted = with_body_separator(to_crlf(sys.stdin.buffer.read()))
    if inserted:
        print(
            "dkim-sidecar sign: the header block ended without an empty line; inserted one "
            "before the first line that is no header field (as Postfix does), which now "
            "starts the body",
            file=sys.stderr,
        )
    fields, body = split_message(message)
    signer = MessageSigner(keys, policy, int(time.time()))
    signer.update(body)
    out = sys.stdout.buffer
    out.write(b"".join(signer.sign(fields)))
    out.write(message)
    if not message.endswith(b"\r\n"):
        out.write(b"\r\n")
    out.flush()
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip().lower() for n in re.split(r"[:,\s]+", text) if n.strip())


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _records(args: argparse.Namespace) -> dict[bytes, bytes]:
    """--record NAME=TXT and --records FILE (lines NAME=TXT). A TXT that starts with a quote
    is taken as zone-file strings, `"v=DKIM1; k=rsa; " "p=MIIB..."`: each quoted string, joined
    (as DNS joins the strings of one record)."""
    items = list(args.record or [])
    if args.records:
        items += [line for line in _read(args.records).decode().splitlines() if line.strip()]
    records: dict[bytes, bytes] = {}
    for item in items:
        name, eq, txt = item.partition("=")
        if not eq:
            raise UsageError(f"record {item!r}: expected NAME=TXT")
        txt = txt.strip()
        if txt.startswith('"'):
            txt = "".join(re.sub(r"\\(.)", r"\1", part) for part in _QUOTED.findall(txt))
        records[name.strip().rstrip(".").lower().encode()] = txt.encode()
    return records


def verify_message(message: bytes, records: dict[bytes, bytes]) -> list[tuple[bool, str]]:
    """Each DKIM-Signature checked by dkimpy: (passed, description), topmost first."""
    import dkim

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        if records:
            return records.get(name.rstrip(b".").lower(), b"")
        return dkim.dnsplug.get_txt(name, timeout=timeout) or b""

    d = dkim.DKIM(message)
    fields, _ = split_message(message)
    out = []
    for i in range(sum(1 for f in fields if f.name == "dkim-signature")):
        try:
            ok = bool(d.verify(idx=i, dnsfunc=dnsfunc))
            why = "" if ok else " (signature or body hash mismatch)"
        except dkim.DKIMException as exc:
            ok, why = False, f" ({exc})"
        sig = d.signature_fields or {}
        tag = " ".join(
            f"{k.decode()}={sig[k].decode(errors='replace')}"
            for k in (b"d", b"s", b"a")
            if k in sig
        )
        out.append((ok, f"{tag}: {'pass' if ok else 'FAIL' + why}"))
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    results = verify_message(to_crlf(sys.stdin.buffer.read()), _records(args))
    if not results:
        print("no DKIM-Signature found")
        return 1
    return _print_verdicts(results)


def _print_verdicts(results: list[tuple[bool, str]]) -> int:
    """One line a signature, topmost first; exit status 0 only if every one passed."""
    for i, (_, line) in enumerate(results, 1):
        print(f"signature {i}: {line}")
    return 0 if all(ok for ok, _ in results) else 1


SAMPLE = (
    b"From: Demo Sender <sender@example.com>\r\n"
    b"To: Someone <someone@example.net>\r\n"
    b"Subject: dkim-sidecar probe\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <probe@example.com>\r\n"
    b"\r\n"
    b"Hello from dkim-sidecar's probe.\r\n"
)


def cmd_probe(args: argparse.Namespace) -> int:
    """Push one message through a running milter as Postfix would, and say what happened."""
    from .milter.client import MilterClient

    message = to_crlf(_read(args.message)) if args.message else SAMPLE
    if args.sample_from and not args.message:
        message = message.replace(b"sender@example.com", args.sample_from.encode())
    try:
        with MilterClient(args.milter, timeout=30) as client:
            client.negotiate()
            if client.connect(args.client_ip) != "continue":
                print(
                    f"not signed: the milter let the connection go at connect "
                    f"({args.client_ip} is not in its relay networks)"
                )
                return 1
            sender = args.sender.encode()
            result = client.send_message(message, sender, auth=args.auth)
    except OSError as exc:
        raise UsageError(f"cannot talk to the milter at {args.milter}: {exc}") from None
    if not result.signatures:
        print(
            f"not signed: the milter answered {result.action} at {result.stage} "
            "(its log line for queue ID 4ABCDEF gives the reason)"
        )
        return 1
    if args.show:
        sys.stdout.buffer.write(result.message)
    print(f"signed: {len(result.signatures)} signature(s)")
    return _print_verdicts(verify_message(result.message, _records(args)))


# --- keys / check-config ---------------------------------------------------------------------


def _load_keys(config: Config) -> tuple[KeySet, list[str]]:
    from .runtime import make_source

    results = []
    unreachable = []
    for spec in config.keys.sources:
        try:
            results.append(make_source(spec, config, os.environ).load())
        except SourceUnavailable as exc:
            unreachable.append(str(exc))
    return KeySet.combine(results), unreachable


def _txt_lookup(
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
    _, config = _load(args.config)
    keys, unreachable = _load_keys(config)
    if (args.record or args.records) and not args.check_dns:
        raise UsageError("--record and --records answer the lookups of --check-dns: add it")
    given = _records(args) if (args.record or args.records) else None
    lookup = _txt_lookup(given) if args.check_dns else None
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
    from .runtime import forwarding_host_warning, outside_forwarding_hosts

    if keys.forwarding_hosts is None:
        return  # no Mailcow Redis read: nothing known about forwarding hosts
    for network in outside_forwarding_hosts(config.relay_networks, keys.forwarding_hosts):
        print(f"warning: {forwarding_host_warning(network)}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    from .peers import MtaPeers, unguarded_listen_warning

    path, config = _load(args.config)
    keys, unreachable = _load_keys(config)
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
    _, config = _load(args.config)
    keys, unreachable = _load_keys(config)
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


# --- entry point -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dkim-sidecar", description=__doc__)
    p.add_argument("--version", action="version", version=f"dkim-sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--config",
            "-c",
            help=f"YAML config (default: $DKIM_SIDECAR_CONFIG, "
            f"else {DEFAULT_CONFIG} if it exists, else built-in defaults)",
        )

    sp = sub.add_parser("run", help="run the milter")
    with_config(sp)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("sign", help="sign a message from stdin to stdout")
    sp.add_argument("--domain", "-d", required=True)
    sp.add_argument("--selector", "-s", action="append", required=True)
    sp.add_argument("--key", "-k", action="append", required=True, help="private key file")
    sp.add_argument("--canon", default="relaxed/relaxed")
    sp.add_argument("--headers", help="header names to sign, colon or comma separated")
    sp.add_argument("--oversign", help="header names to oversign (empty: none)")
    sp.add_argument("--expire", type=int, help="seconds until the signature expires (x=)")
    sp.set_defaults(func=cmd_sign)

    def with_records(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--record",
            action="append",
            metavar="NAME=TXT",
            help="answer this DNS name from here instead of DNS (repeatable)",
        )
        sp.add_argument("--records", metavar="FILE", help="a file of NAME=TXT lines")

    sp = sub.add_parser("verify", help="verify the DKIM signatures of a message from stdin")
    with_records(sp)
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("probe", help="send a message through a running milter and verify it")
    sp.add_argument("--milter", default="inet:127.0.0.1:8891")
    sp.add_argument("--client-ip", default="127.0.0.1", help="the client address to present")
    sp.add_argument("--sender", default="sender@example.com", help="envelope sender")
    sp.add_argument("--auth", help="present an authenticated login ({auth_authen})")
    sp.add_argument("--show", action="store_true", help="print the signed message")
    sp.add_argument(
        "--from",
        dest="sample_from",
        metavar="ADDRESS",
        help="From address of the built-in sample (e.g. one of your domains)",
    )
    sp.add_argument("message", nargs="?", help="message file (default: a built-in sample)")
    with_records(sp)
    sp.set_defaults(func=cmd_probe)

    sp = sub.add_parser("keys", help="list the keys the config loads and their DNS records")
    with_config(sp)
    sp.add_argument(
        "--check-dns",
        action="store_true",
        help="look each record up and say whether it matches the key (exit 1 if one does not)",
    )
    with_records(sp)
    sp.set_defaults(func=cmd_keys)

    sp = sub.add_parser("check-config", help="validate the config and its keys")
    with_config(sp)
    sp.set_defaults(func=cmd_check_config)

    sp = sub.add_parser(
        "postfix-map",
        help="print a Postfix CIDR table for smtpd_milter_maps: only the relay networks reach "
        "the sidecar",
    )
    with_config(sp)
    sp.add_argument(
        "--milters",
        default=DEFAULT_MAP_MILTERS,
        help="the milter list for relay clients (default: Mailcow's rspamd, then the sidecar)",
    )
    sp.set_defaults(func=cmd_postfix_map)

    sp = sub.add_parser("genkey", help="make a key file for a key directory")
    sp.add_argument("--domain", "-d", required=True)
    sp.add_argument("--selector", "-s", required=True)
    sp.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    sp.add_argument("--bits", type=int, default=2048)
    sp.add_argument("--out", default=".", help="directory to write <domain>.<selector>.key into")
    sp.set_defaults(func=cmd_genkey)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.func is not cmd_run:
        from .logs import setup_cli_logging

        setup_cli_logging()
    try:
        return int(args.func(args))
    except (UsageError, KeyLoadError) as exc:
        print(f"dkim-sidecar: error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"dkim-sidecar: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    logging.basicConfig()
    sys.exit(main())
