"""A PROTOTYPE, for measurement only: the milter protocol served by asyncio in one thread,
driving the very same Session (session.py), Runtime and Reporter as the real service, instead
of libmilter + pymilter. It exists to put numbers behind the proposal in issue 7 (replace the
pymilter adapter), not to run mail: no signals, no reload, no unix sockets, minimal checks.

    .venv/bin/python bench/proto_asyncio.py            # both side by side, prints the ratio
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from dkim_sidecar.config import parse_config  # noqa: E402
from dkim_sidecar.keystore import DirectoryKeySource, KeySet  # noqa: E402
from dkim_sidecar.logs import setup_logging  # noqa: E402
from dkim_sidecar.metrics import Metrics  # noqa: E402
from dkim_sidecar.runtime import Runtime  # noqa: E402
from dkim_sidecar.session import Action, Session  # noqa: E402

# protocol flags we ask for: no HELO, no RCPT, no unknown, no reply to headers, exact header
# bytes (libmilter's mfdef.h)
P_NOHELO, P_NORCPT, P_NR_HDR, P_NOUNKNOWN, P_HDR_LEADSPC = 0x2, 0x8, 0x80, 0x100, 0x100000
ACTIONS = 0x1  # SMFIF_ADDHDRS
REPLY = {Action.CONTINUE: b"c", Action.ACCEPT: b"a", Action.TEMPFAIL: b"t"}


def frame(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


async def serve_connection(reader, writer, runtime, reporter) -> None:  # type: ignore[no-untyped-def]
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    session = Session(lambda: runtime, reporter)
    macros: dict[str, str] = {}
    try:
        while True:
            head = await reader.readexactly(4)
            (size,) = struct.unpack("!I", head)
            body = await reader.readexactly(size)
            cmd, data = body[:1], body[1:]
            if cmd == b"O":
                _, _, offered = struct.unpack("!III", data[:12])
                want = P_NOHELO | P_NORCPT | P_NR_HDR | P_NOUNKNOWN | P_HDR_LEADSPC
                writer.write(frame(b"O", struct.pack("!III", 6, ACTIONS, offered & want)))
            elif cmd == b"D":
                parts = data[1:].split(b"\0")
                for k, v in zip(parts[0::2], parts[1::2], strict=False):
                    macros[k.decode()] = v.decode("utf-8", "replace")
            elif cmd == b"C":
                _host, _, rest = data.partition(b"\0")
                addr = rest[3:].rstrip(b"\0").decode()
                writer.write(frame(REPLY[session.connect(addr)]))
            elif cmd == b"M":
                sender = data.split(b"\0", 1)[0].strip(b"<>")
                writer.write(frame(REPLY[session.mail(sender, macros.get("{auth_authen}"))]))
            elif cmd in (b"R", b"T"):
                writer.write(frame(b"c"))
            elif cmd == b"L":
                name, value, _ = data.split(b"\0", 2)
                session.header(name, value)
            elif cmd == b"N":
                writer.write(frame(REPLY[session.end_of_headers(macros.get("i"))]))
            elif cmd == b"B":
                writer.write(frame(REPLY[session.body(data)]))
            elif cmd == b"E":
                action, fields = session.end_of_message(macros.get("i"))
                out = []
                for raw in reversed(fields):
                    name, _, value = raw.partition(b":")
                    value = value[:-2].replace(b"\r\n", b"\n")
                    out.append(frame(b"i", struct.pack("!I", 0) + name + b"\0" + value + b"\0"))
                out.append(frame(REPLY[action]))
                writer.write(b"".join(out))  # one write: no small-write stall
            elif cmd == b"A":
                session.abort()
            elif cmd == b"Q":
                break
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        session.close()
        writer.close()


def run_proto(port: int, keydir: str) -> None:
    from dkim_sidecar.service import Reporter

    setup_logging("text", logging.INFO)
    config = parse_config(
        {"relay_networks": ["192.0.2.0/24"], "keys": {"directory": keydir}}, "proto", {}
    )
    runtime = Runtime.build(config, KeySet.combine([DirectoryKeySource(keydir).load()]))
    reporter = Reporter(Metrics(), lambda: False)

    async def main() -> None:
        server = await asyncio.start_server(
            lambda r, w: serve_connection(r, w, runtime, reporter), "127.0.0.1", port
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def compare() -> None:
    from common import cpu_seconds, make_message  # type: ignore[import-not-found]
    from dkim_sidecar.keys import Algorithm, generate_key
    from harness.sidecar import Sidecar, free_port, wait_for, write_keys
    from milterload import run_load  # type: ignore[import-not-found]

    work = Path(tempfile.mkdtemp(prefix="proto-"))
    write_keys(work / "keys", [("example.com", "bench", generate_key(Algorithm.RSA_SHA256))])
    real = Sidecar(
        work / "real",
        {"relay_networks": ["192.0.2.0/24"], "keys": {"directory": str(work / "keys")}},
    ).start()
    port = free_port()
    log = open(work / "proto.log", "wb")  # noqa: SIM115
    proto = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), str(work / "keys")], stdout=log, stderr=log
    )

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, 10, "the prototype")
    try:
        rows = []
        for size, count in ((4096, 3000), (1048576, 150)):
            message = make_message(size)
            for rnd in range(2):
                for name, pid, addr in (
                    ("pymilter sidecar", real.proc.pid, real.milter),  # type: ignore[union-attr]
                    ("asyncio prototype", proto.pid, f"inet:127.0.0.1:{port}"),
                ):
                    before = [0.0]
                    result = run_load(
                        addr,
                        message,
                        count,
                        16,
                        "192.0.2.10",
                        before_go=lambda pid=pid, b=before: b.__setitem__(0, cpu_seconds(pid)),
                    )
                    cpu = (cpu_seconds(pid) - before[0]) / result.messages * 1000
                    rows.append((size, rnd, name, result.rate, cpu, result.signed, result.messages))
                    print(
                        f"{size // 1024:>5} KB round {rnd} {name:18s} {result.rate:7.0f} msg/s  "
                        f"{cpu:5.2f} ms CPU/msg  signed {result.signed}/{result.messages}"
                    )
    finally:
        proto.terminate()
        proto.wait(10)
        real.stop()


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--serve":
        run_proto(int(sys.argv[2]), sys.argv[3])
    else:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        t0 = time.monotonic()
        compare()
        print(f"({time.monotonic() - t0:.0f} s)")
