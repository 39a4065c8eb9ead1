"""End to end through a real Postfix: Postfix's own `smtp-source` into one throwaway Postfix
instance per milter setup (tests/harness/postfix.py), relaying into Postfix's `smtp-sink`.

Before anything is timed, every instance relays a few messages into our byte-exact sink
(tests/harness/sink.py) and dkimpy checks that the signing setups really sign and the others
really do not; only then is each relay host switched to `smtp-sink`, which costs next to no
CPU. The rate is messages / wall time of `smtp-source`; every run then waits until the queue
is empty, so no run starts with another's backlog.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common import CLK_TCK, Milter, cpu_seconds, free_port, verify, wait_listening
from harness.postfix import PostfixInstance
from harness.procfs import group_members
from harness.sink import SmtpSink

SENDER = "bench@example.com"  # smtp-source writes it into From: too
RCPT = "rcpt@example.net"


def _tool(name: str) -> str:
    for path in (f"/usr/sbin/{name}", f"/usr/lib/postfix/sbin/{name}", shutil.which(name)):
        if path and Path(path).exists():
            return path
    raise FileNotFoundError(f"{name} not found (Debian package postfix)")


@dataclass
class E2EResult:
    mode: str
    messages: int
    sessions: int
    elapsed: float  # smtp-source wall time
    drained: float  # smtp-source start until the queue was empty
    milter_cpu: float  # CPU seconds of the milter process over the run (0 without one)
    postfix_cpu: float  # CPU seconds of this Postfix instance's processes over the run
    tools_cpu: float  # CPU seconds of smtp-source and smtp-sink over the run

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed

    @property
    def total_cpu(self) -> float:
        return self.milter_cpu + self.postfix_cpu + self.tools_cpu


def postfix_cpu(inst: PostfixInstance) -> float:
    """CPU seconds of an instance: its live processes (the master's process group) plus what
    the master's exited children used (cutime/cstime, counted once the master reaped them)."""
    master = inst.master_pid()
    if master is None:
        return 0.0
    total = 0.0
    for pid in group_members(master):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
        if pid == master:
            total += int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class EndToEnd:
    """`modes` maps a setup name to the milter it uses (None: no milter); `main_cf` gives a
    setup main.cf settings of its own (e.g. smtpd_milter_maps), over the ones set here."""

    def __init__(
        self,
        workdir: Path,
        modes: dict[str, Milter | None],
        main_cf: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.modes = modes
        self.main_cf = main_cf or {}
        self.instances: dict[str, PostfixInstance] = {}
        self.sink_proc: subprocess.Popen[bytes] | None = None
        self.sink_port = 0
        self.smtp_source = _tool("smtp-source")
        self.smtp_sink = _tool("smtp-sink")

    def __enter__(self) -> EndToEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, record: bytes, checks: int = 3) -> dict[str, int]:
        """Start the instances, check who signs, switch to smtp-sink; returns, per mode, how
        many of `checks` messages came out with a DKIM-Signature that dkimpy verifies."""
        signed: dict[str, int] = {}
        with SmtpSink() as check_sink:
            for name, milter in self.modes.items():
                inst = PostfixInstance(
                    check_sink.port,
                    milter.address if milter else "",
                    ipv6=False,
                    base_dir=self.workdir / f"postfix-{name}",
                    # as many smtpd processes as smtp-source sessions, no connection limits
                    extra_main_cf={"default_process_limit": "200", **self.main_cf.get(name, {})},
                )
                self.instances[name] = inst
                inst.start()
            for name, inst in self.instances.items():
                check_sink.clear()
                self._source(inst, checks, sessions=1, size=4096)
                got = check_sink.wait_for(checks, timeout=30)
                signed[name] = sum(
                    1
                    for m in got
                    if b"\ndkim-signature:" in b"\n" + m.header_block.lower()
                    and verify(m.data, record)
                )
                inst.wait_queue_empty(timeout=30)
        # the timed runs relay into Postfix's smtp-sink (C, next to no CPU)
        self.sink_port = free_port()
        self.sink_proc = subprocess.Popen(
            [self.smtp_sink, "-u", "postfix", f"127.0.0.1:{self.sink_port}", "1024"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.sink_port, 10, lambda: self.sink_proc.poll() is None)  # type: ignore[union-attr]
        for inst in self.instances.values():
            inst.set_main_cf({"relayhost": f"[127.0.0.1]:{self.sink_port}"})
        return signed

    def _source(self, inst: PostfixInstance, messages: int, sessions: int, size: int) -> None:
        cmd = [
            self.smtp_source,
            "-s",
            str(sessions),
            "-m",
            str(messages),
            "-l",
            str(size),
            "-f",
            SENDER,
            "-t",
            RCPT,
            "-M",
            "client.example",
            "-S",
            "bench",
            f"127.0.0.1:{inst.port}",
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if p.returncode != 0:
            raise RuntimeError(
                f"smtp-source failed ({p.returncode}): {p.stdout}{p.stderr}\n{inst.log_tail()}"
            )

    def run(self, mode: str, messages: int, sessions: int, size: int = 4096) -> E2EResult:
        inst = self.instances[mode]
        milter = self.modes[mode]
        assert self.sink_proc is not None
        cpu0 = milter.cpu() if milter else 0.0
        pf0, src0, sink0 = postfix_cpu(inst), _children_cpu(), cpu_seconds(self.sink_proc.pid)
        t0 = time.monotonic()
        self._source(inst, messages, sessions, size)
        t1 = time.monotonic()
        inst.wait_queue_empty(timeout=300)
        t2 = time.monotonic()
        time.sleep(0.05)  # let smtp-sink finish its last session
        tools = _children_cpu() - src0 + cpu_seconds(self.sink_proc.pid) - sink0
        return E2EResult(
            mode=mode,
            messages=messages,
            sessions=sessions,
            elapsed=t1 - t0,
            drained=t2 - t0,
            milter_cpu=(milter.cpu() - cpu0) if milter else 0.0,
            postfix_cpu=postfix_cpu(inst) - pf0,
            tools_cpu=tools,
        )

    def stop(self) -> None:
        for inst in self.instances.values():
            inst.cleanup()
        self.instances.clear()
        if self.sink_proc is not None:
            if self.sink_proc.poll() is None:
                self.sink_proc.terminate()
                try:
                    self.sink_proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.sink_proc.kill()
                    self.sink_proc.wait(5)
            self.sink_proc = None
