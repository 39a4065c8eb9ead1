"""`make run`: the milter on the built-in defaults with a demo key directory, no Redis.

On first use it makes an RSA-2048 and an Ed25519 key for example.com under ./demo/keys
(git-ignored) and writes the DNS records they would need to ./demo/dns.txt. Then it runs the
milter in the foreground on inet:127.0.0.1:8891 (relay network 127.0.0.0/8, metrics on
127.0.0.1:9901). In another terminal, `.venv/bin/dkim-sidecar probe --records demo/dns.txt`
pushes a sample message through it and verifies the signatures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import ENV_KEYS_DIRECTORY
from .dkim.keys import Algorithm, SigningKey, generate_key
from .keysources.files import write_new_secret

DOMAIN = "example.com"
DEMO_KEYS = ((Algorithm.RSA_SHA256, "demo"), (Algorithm.ED25519_SHA256, "demo-ed"))


def prepare(base: Path) -> Path:
    keys = base / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    records = []
    for algorithm, selector in DEMO_KEYS:
        path = keys / f"{DOMAIN}.{selector}.key"
        if not path.exists():
            write_new_secret(path, generate_key(algorithm))
            print(f"made demo key {path}")
        key = SigningKey.load(DOMAIN, selector, path.read_bytes(), "demo")
        records.append(f'{key.dns_name}="{key.dns_record()}"')
    (base / "dns.txt").write_text("\n".join(records) + "\n")
    return keys


def main() -> int:
    base = Path(os.environ.get("DKIM_SIDECAR_DEMO_DIR", "demo")).resolve()
    keys = prepare(base)
    print(f"DNS records the demo keys would need: {base / 'dns.txt'}")
    print("try it from another terminal: .venv/bin/dkim-sidecar probe --records demo/dns.txt")
    os.environ.setdefault(ENV_KEYS_DIRECTORY, str(keys))
    from .cli import main as cli_main

    return cli_main(["run"])


if __name__ == "__main__":
    sys.exit(main())
