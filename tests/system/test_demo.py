"""`make run`: the demo (dkim_sidecar.demo) starts the milter on the built-in defaults with keys
it makes itself, and `dkim-sidecar probe --records demo/dns.txt` gets a message signed and
verified by it, as the README says. Ports come from the environment overrides, so the test
does not need 8891 and 9901 to be free."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from harness.dkimcheck import verify_all
from harness.sidecar import clean_env, free_port, wait_for

CLI = Path(sys.executable).parent / "dkim-sidecar"


def test_make_run_demo_signs_what_probe_sends(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    env = clean_env(
        DKIM_SIDECAR_DEMO_DIR=str(tmp_path / "demo"),
        DKIM_SIDECAR_LISTEN=f"inet:127.0.0.1:{port}",
        DKIM_SIDECAR_METRICS_LISTEN=f"inet:127.0.0.1:{metrics}",
    )
    log = open(tmp_path / "demo.log", "wb")  # noqa: SIM115 - closed below
    demo = subprocess.Popen(
        [sys.executable, "-m", "dkim_sidecar.demo"], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        wait_for(lambda: b"listening" in (tmp_path / "demo.log").read_bytes(), 60, "the demo")
        records = tmp_path / "demo" / "dns.txt"
        assert records.read_text().count("_domainkey.example.com") == 2
        probe = subprocess.run(
            [
                str(CLI), "probe", "--show", "--milter", f"inet:127.0.0.1:{port}",
                "--records", str(records),
            ],
            capture_output=True,
            timeout=60,
            check=False,
            env=clean_env(),  # like the demo: nothing of the host's environment
        )  # fmt: skip
        out = probe.stdout
        assert probe.returncode == 0, out + probe.stderr
        assert b"signed: 2 signature(s)" in out
        # the message as the milter left it, checked by dkimpy against the demo's records
        message = out[: out.index(b"signed: 2 signature(s)")]
        dns = dict(line.split("=", 1) for line in records.read_text().splitlines())
        dns = {name: value.strip('"') for name, value in dns.items()}
        assert verify_all(message, dns) == [True, True]
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 0
        log.close()
    # the keys it made stay for the next start (made only when missing)
    keys = sorted(p.name for p in (tmp_path / "demo" / "keys").iterdir())
    assert keys == ["example.com.demo-ed.key", "example.com.demo.key"]


def test_demo_keys_are_made_once(tmp_path: Path) -> None:
    from dkim_sidecar.demo import prepare

    keys = prepare(tmp_path)
    first = {p.name: p.read_bytes() for p in keys.iterdir()}
    records = (tmp_path / "dns.txt").read_text()
    prepare(tmp_path)
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == first
    assert (tmp_path / "dns.txt").read_text() == records
