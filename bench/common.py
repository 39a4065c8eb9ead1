"""What every part of the benchmark shares: the key, the messages, the two milters as
processes, and what /proc says about a process (CPU, memory, its sockets).

Everything listens on 127.0.0.1 only. Every process started here is stopped by its owner
(`with` blocks), by PID, never by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))  # the test harness: Sidecar, PostfixInstance

from harness.sidecar import Sidecar, free_port, write_keys  # noqa: E402

DOMAIN = "example.com"
SELECTOR = "bench"
RELAY_NET = "192.0.2.0/24"  # where the load client says its clients are
CLIENT_IP = "192.0.2.10"
OPENDKIM = "/usr/sbin/opendkim"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- /proc ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mem_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), VmSize of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmSize", "VmPeak", "Threads"):
                out[key] = int(value.split()[0])
    return out


def machine_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) // 1024 // 1024 + 1} GiB"

    def cmd(*args: str) -> str:
        try:
            p = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "missing"
        return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr) else ""

    import cryptography
    import dkim  # noqa: F401
    from cryptography.hazmat.backends.openssl.backend import backend

    try:
        from importlib.metadata import version

        dkimpy = version("dkimpy")
    except Exception:
        dkimpy = "?"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "openssl": backend.openssl_version_text(),
        "cryptography": cryptography.__version__,
        "dkimpy": dkimpy,
        "opendkim": cmd(OPENDKIM, "-V"),
        "postfix": cmd("/usr/sbin/postconf", "-dh", "mail_version"),
        "commit": cmd("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
    }


# --- sockets of another process (pidfd_getfd, Linux 5.6+) ---------------------------------

# --- the key and the messages --------------------------------------------------------------


def make_key(directory: Path) -> tuple[Path, bytes]:
    """One RSA-2048 key (PEM, PKCS#8) for example.com, selector `bench`: for both milters."""
    from dkim_sidecar.dkim.keys import Algorithm, generate_key

    pem = generate_key(Algorithm.RSA_SHA256, 2048)
    write_keys(directory / "keys", [(DOMAIN, SELECTOR, pem)])
    return directory / "keys" / f"{DOMAIN}.{SELECTOR}.key", pem


def dns_record(pem: bytes) -> bytes:
    from dkim_sidecar.dkim.keys import SigningKey

    return SigningKey.load(DOMAIN, SELECTOR, pem).dns_record().encode()


def make_message(body_size: int, seq: int = 0) -> bytes:
    """A plain-text message with a body of `body_size` octets (76-column lines, CRLF)."""
    head = (
        b"From: Bench Sender <bench@example.com>\r\n"
        b"To: Receiver <rcpt@example.net>\r\n"
        b"Cc: other@example.net\r\n"
        b"Subject: benchmark message " + str(seq).encode() + b"\r\n"
        b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <bench." + str(seq).encode() + b"@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen j.\r\n"
    body = line * (body_size // len(line) + 1)
    body = body[: body_size - 2] + b"\r\n"
    return head + body


def verify(message: bytes, record: bytes) -> bool:
    """dkimpy's verdict on the topmost DKIM-Signature, against our one record."""
    import dkim

    name = f"{SELECTOR}._domainkey.{DOMAIN}.".encode()
    try:
        return bool(
            dkim.verify(message, dnsfunc=lambda n, timeout=5: record if n == name else None)
        )
    except Exception:
        return False


# --- the milters ---------------------------------------------------------------------------


@dataclass
class Milter:
    """A running milter process, whatever it is."""

    name: str
    pid: int
    port: int

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def mem(self) -> dict[str, int]:
        return mem_kb(self.pid)


def wait_listening(port: int, timeout: float, alive: Any = None) -> float:
    """Seconds until 127.0.0.1:port accepts a connection (polled every 2 ms)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if alive is not None and not alive():
            raise RuntimeError(f"the process listening on {port} died")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return time.monotonic() - t0
        except OSError:
            time.sleep(0.002)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def sidecar(
    workdir: Path, keydir: Path, relay: Sequence[str], name: str = "sidecar"
) -> Iterator[Milter]:
    """`dkim-sidecar run` with the bench key, default settings otherwise (log level info:
    one line per message, as in production)."""
    s = Sidecar(
        workdir / name,
        {"relay_networks": list(relay), "keys": {"directory": str(keydir)}},
    )
    s.start()
    try:
        assert s.proc is not None
        yield Milter(name, s.proc.pid, s.port)
    finally:
        rc = s.stop()
        if rc != 0:
            print(f"warning: {name} exited with {rc}; log: {s.log_path}", file=sys.stderr)


def opendkim_conf(workdir: Path, keyfile: Path, port: int, internal: Sequence[str]) -> Path:
    conf = workdir / f"opendkim-{port}.conf"
    conf.write_text(
        "\n".join(
            [
                "Mode s",
                f"Domain {DOMAIN}",
                f"Selector {SELECTOR}",
                f"KeyFile {keyfile}",
                "Canonicalization relaxed/relaxed",
                "OversignHeaders From",
                f"InternalHosts {','.join(internal)}",
                f"Socket inet:{port}@127.0.0.1",
                "Syslog no",
                "RequireSafeKeys no",
                "UMask 007",
                f"PidFile {workdir}/opendkim-{port}.pid",
                "",
            ]
        )
    )
    return conf


@contextlib.contextmanager
def opendkim(
    workdir: Path,
    keyfile: Path,
    internal: Sequence[str],
    name: str = "opendkim",
    preload: Path | None = None,
) -> Iterator[Milter]:
    """OpenDKIM in the foreground (`-f -x conf`), signing mode, the same key; `preload`: a
    shared object to LD_PRELOAD into it (bench/nostall.c)."""
    port = free_port()
    conf = opendkim_conf(workdir, keyfile, port, internal)
    env = None if preload is None else {**os.environ, "LD_PRELOAD": str(preload)}
    log = open(workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([OPENDKIM, "-f", "-x", str(conf)], stdout=log, stderr=log, env=env)
    try:
        wait_listening(port, 10, lambda: proc.poll() is None)
        yield Milter(name, proc.pid, port)
    finally:
        stop_process(proc)
        log.close()


def build_nostall(workdir: Path) -> Path | None:
    """Compile bench/nostall.c into workdir; None without a C compiler (the row is left out)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = workdir / "nostall.so"
    built = subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(ROOT / "bench" / "nostall.c"), "-ldl"],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        print(f"warning: bench/nostall.c did not build, row left out:\n{built.stderr}")
        return None
    return out


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def startup_seconds(cmd: list[str], port: int, env: dict[str, str] | None = None) -> float:
    """Seconds from spawning `cmd` until `port` accepts a connection; then stop it."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd="/"
    )
    try:
        wait_listening(port, 15, lambda: proc.poll() is None)
        return time.monotonic() - t0
    finally:
        stop_process(proc)
