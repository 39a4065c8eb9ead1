"""The commands about messages: sign and verify offline, probe a running milter."""

from __future__ import annotations

import argparse
import sys
import time

from ..config import Config
from ..dkim.canon import Canonicalization
from ..dkim.header import split_message, with_body_separator
from ..dkim.keys import SigningKey
from ..dkim.signer import MessageSigner, SigningPolicy
from .common import (
    UsageError,
    dns_records,
    header_names,
    read_input,
    to_crlf,
)

# --- sign / verify ---------------------------------------------------------------------------


def cmd_sign(args: argparse.Namespace) -> int:
    selectors = args.selector or []
    key_files = args.key or []
    if len(selectors) != len(key_files):
        raise UsageError(f"{len(key_files)} --key but {len(selectors)} --selector: give one each")
    keys = []
    for selector, key_file in zip(selectors, key_files, strict=True):
        keys.append(SigningKey.load(args.domain, selector, read_input(key_file), key_file))
    try:
        canon = Canonicalization.parse(args.canon)
    except ValueError as exc:
        raise UsageError(f"--canon: {exc}") from None
    config = Config()
    headers = header_names(args.headers) if args.headers else config.sign_headers
    oversign = header_names(args.oversign) if args.oversign is not None else config.oversign_headers
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
    results = verify_message(to_crlf(sys.stdin.buffer.read()), dns_records(args))
    if not results:
        print("no DKIM-Signature found")
        return 1
    return print_verdicts(results)


def print_verdicts(results: list[tuple[bool, str]]) -> int:
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
    from ..milter.client import MilterClient

    message = to_crlf(read_input(args.message)) if args.message else SAMPLE
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
    return print_verdicts(verify_message(result.message, dns_records(args)))
