"""The `dkim-sidecar` command: run the milter, sign and verify offline, inspect keys and config.

Every user error ends in one clear line and exit status 2 (1 where a check failed), never a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..config import ConfigError
from ..dkim.keys import KeyLoadError
from .common import DEFAULT_CONFIG, UsageError, load_config_of
from .keys import DEFAULT_MAP_MILTERS, cmd_check_config, cmd_genkey, cmd_keys, cmd_postfix_map
from .mail import cmd_probe, cmd_sign, cmd_verify

# --- run -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from ..logs import setup_logging
    from ..service import Service

    path, config = load_config_of(args.config)
    setup_logging(config.log_format.value, config.log_level.level)
    return Service(path, config).run()


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

    def with_dns_records(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--record",
            action="append",
            metavar="NAME=TXT",
            help="answer this DNS name from here instead of DNS (repeatable)",
        )
        sp.add_argument("--records", metavar="FILE", help="a file of NAME=TXT lines")

    sp = sub.add_parser("verify", help="verify the DKIM signatures of a message from stdin")
    with_dns_records(sp)
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
    with_dns_records(sp)
    sp.set_defaults(func=cmd_probe)

    sp = sub.add_parser("keys", help="list the keys the config loads and their DNS records")
    with_config(sp)
    sp.add_argument(
        "--check-dns",
        action="store_true",
        help="look each record up and say whether it matches the key (exit 1 if one does not)",
    )
    with_dns_records(sp)
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
        from ..logs import setup_cli_logging

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
