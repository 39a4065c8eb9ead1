"""Container health check for dkim-sidecar: exit 0 when the running sidecar answers, 1 if not.

Runs inside the container (Dockerfile HEALTHCHECK, compose `healthcheck:`) with the image's
venv Python, so it needs no curl. It finds the address to check the way the sidecar does:

1. the config file: `--config PATH` from PID 1's command line, else $DKIM_SIDECAR_CONFIG, else
   /etc/dkim-sidecar/config.yml;
2. `metrics.listen` from that file, overridden by DKIM_SIDECAR_METRICS_LISTEN like the sidecar
   does; then GET /healthz there (a wildcard address is checked on loopback) and expect 200;
3. if the metrics endpoint is turned off, connect to the milter socket (`listen`, or
   DKIM_SIDECAR_LISTEN) instead.

DKIM_SIDECAR_HEALTHCHECK_URL, when set, is fetched as is and nothing else is looked at.
It runs with the image's venv Python: the listen addresses are read by the sidecar's own
parser (dkim_sidecar.milter.address), PyYAML reads the file.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from pathlib import Path

from dkim_sidecar.milter.address import Listen, ListenKind

DEFAULT_CONFIG = "/etc/dkim-sidecar/config.yml"
DEFAULT_METRICS = "inet:127.0.0.1:9901"
DEFAULT_LISTEN = "inet:127.0.0.1:8891"
TIMEOUT = 4.0


def config_path() -> str:
    """The --config argument of the process the container runs, else what the sidecar would
    fall back to: $DKIM_SIDECAR_CONFIG, then the image's default path."""
    try:
        argv = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    args = [a.decode("utf-8", "replace") for a in argv]
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args) and args[i + 1]:
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return os.environ.get("DKIM_SIDECAR_CONFIG", "").strip() or DEFAULT_CONFIG


def load_settings(path: str) -> dict[str, object]:
    """The YAML config as a dict; {} when it cannot be read (the sidecar reports that itself)."""
    try:
        import yaml  # only the image's venv Python has it
    except ImportError:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def check_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:  # noqa: S310 - local URL
            return resp.status == 200
    except OSError:
        return False


def check_socket(family: int, address: str | tuple[str, int]) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(address)
    except OSError:
        return False
    return True


def main() -> int:
    url = os.environ.get("DKIM_SIDECAR_HEALTHCHECK_URL", "").strip()
    if url:
        return 0 if check_http(url) else 1

    settings = load_settings(config_path())
    metrics = settings.get("metrics")
    metrics_listen: object = DEFAULT_METRICS
    if isinstance(metrics, dict) and "listen" in metrics:
        metrics_listen = metrics["listen"]
    env_metrics = os.environ.get("DKIM_SIDECAR_METRICS_LISTEN")
    if env_metrics is not None:
        metrics_listen = None if env_metrics.strip() in ("", "off") else env_metrics

    try:
        if isinstance(metrics_listen, str) and metrics_listen:
            family, target = Listen.parse(metrics_listen, allow_unix=False).connect_to()
            assert isinstance(target, tuple)
            host = f"[{target[0]}]" if family == socket.AF_INET6 else target[0]
            return 0 if check_http(f"http://{host}:{target[1]}/healthz") else 1
        listen = os.environ.get("DKIM_SIDECAR_LISTEN", "").strip() or settings.get("listen")
        address = Listen.parse(listen if isinstance(listen, str) else DEFAULT_LISTEN)
        family, target = address.connect_to()
        if check_socket(family, target):
            return 0
        if address.kind is ListenKind.INET6 and address.host == "::":
            # the sidecar listens on IPv4 only where the container has no IPv6
            return 0 if check_socket(socket.AF_INET, ("127.0.0.1", target[1])) else 1
        return 1
    except ValueError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
