"""`make bench`: dkim-sidecar against OpenDKIM (same RSA-2048 key, same messages, same client),
interleaved over several rounds, and against dkimpy offline. Writes docs/benchmarks.md and
docs/benchmarks.png; never part of `make test`.

    .venv/bin/python bench/run.py            # everything (5-10 minutes), writes docs/
    .venv/bin/python bench/run.py --quick    # one short round (~1 minute), writes bench/out/
    .venv/bin/python bench/run.py --only milter,e2e --rounds 5
    .venv/bin/python bench/run.py --profile  # py-spy profiles of the milter under load
    .venv/bin/python bench/run.py --from-json bench/out/results.json  # render the report again

Sections: offline (MessageSigner vs dkim.sign, RSA and SHA-256 limits), startup, milter
(milter-protocol load client, bench/milterload.py), e2e (real Postfix, smtp-source,
bench/e2e.py), memory (50 MB message through a fresh milter). Everything runs on 127.0.0.1;
every process started here is stopped here. The end-to-end part needs root (Postfix).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"  # git-ignored: raw JSON, quick reports, profiles

FULL: dict[str, Any] = {
    "rounds": 3,
    "offline_seconds": 1.0,
    # (label, body size, concurrency, messages)
    "milter": [("4 KB", 4096, 16, 2000), ("4 KB", 4096, 1, 100), ("1 MB", 1 << 20, 16, 120)],
    "e2e_messages": 2000,
    "e2e_sessions": 8,
    "latency_messages": 100,
    "memory_mb": 50,
    "startup_runs": 3,
}
QUICK: dict[str, Any] = {
    "rounds": 1,
    "offline_seconds": 0.5,
    "milter": [("4 KB", 4096, 16, 600), ("4 KB", 4096, 1, 40), ("1 MB", 1 << 20, 16, 40)],
    "e2e_messages": 600,
    "e2e_sessions": 8,
    "latency_messages": 30,
    "memory_mb": 50,
    "startup_runs": 2,
}
SECTIONS = ("offline", "startup", "milter", "e2e", "memory")


def bootstrap() -> None:
    """Run under the project's venv; install matplotlib there if it is missing (the chart)."""
    venv_py = ROOT / ".venv" / "bin" / "python"
    try:
        import dkim_sidecar  # noqa: F401
    except ImportError:
        if venv_py.exists() and Path(sys.executable) != venv_py:
            os.execv(str(venv_py), [str(venv_py), *sys.argv])
        sys.exit("dkim_sidecar is not importable: run `make venv` first")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench: installing matplotlib into", sys.prefix, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.8"], check=False
        )


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --- sections ------------------------------------------------------------------------------


def run_offline(cfg: dict[str, Any], pem: bytes) -> dict[str, Any]:
    import offline
    from common import median

    sizes = {"4 KB": 4096, "1 MB": 1 << 20}
    rounds = [offline.run(pem, sizes, cfg["offline_seconds"]) for _ in range(cfg["rounds"])]
    by_size = {}
    for label in sizes:
        ours = median([r[label]["sidecar"] for r in rounds])
        theirs = median([r[label]["dkimpy"] for r in rounds])
        ratios = [r[label]["sidecar"] / r[label]["dkimpy"] for r in rounds]
        by_size[label] = {"sidecar": ours, "dkimpy": theirs, "ratio": median(ratios)}
        log(f"offline {label}: sidecar {ours:.0f}/s, dkimpy {theirs:.1f}/s, {median(ratios):.1f}x")
    lim = offline.limits(pem, cfg["offline_seconds"])
    log(f"limits: RSA-2048 sign {lim['rsa_sign_ms']:.3f} ms, SHA-256 {lim['sha256_mb_s']:.0f} MB/s")
    return {
        "rounds": rounds,
        "limits": lim,
        "summary": {"by_size": by_size, "ratio_4k": by_size["4 KB"]["ratio"]},
    }


def run_startup(cfg: dict[str, Any], work: Path, keyfile: Path, have_opendkim: bool) -> dict:
    import yaml

    from common import free_port, median, opendkim_conf, startup_seconds

    runs, od_runs = [], []
    env = {k: v for k, v in os.environ.items() if not k.startswith("DKIM_SIDECAR_")}
    for i in range(cfg["startup_runs"]):
        port = free_port()
        conf = work / f"startup-{i}.yml"
        conf.write_text(
            yaml.safe_dump(
                {
                    "listen": f"inet:127.0.0.1:{port}",
                    "metrics": {"listen": f"inet:127.0.0.1:{free_port()}"},
                    "keys": {"directory": str(keyfile.parent)},
                }
            )
        )
        cmd = [sys.executable, "-m", "dkim_sidecar.cli", "run", "--config", str(conf)]
        runs.append(startup_seconds(cmd, port, env))
        if have_opendkim:
            from common import OPENDKIM

            port = free_port()
            oconf = opendkim_conf(work, keyfile, port, ["127.0.0.1"])
            od_runs.append(startup_seconds([OPENDKIM, "-f", "-x", str(oconf)], port))
    log(f"startup: sidecar {median(runs):.3f} s, opendkim {median(od_runs):.3f} s")
    return {
        "sidecar_runs": runs,
        "opendkim_runs": od_runs,
        "sidecar_s": median(runs),
        "opendkim_s": median(od_runs) if od_runs else None,
    }


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def milter_run(milter: Any, label: str, size: int, conc: int, count: int) -> dict[str, Any]:
    from common import CLIENT_IP, machine_cpu_seconds, make_message
    from milterload import run_load

    message = make_message(size)
    box: dict[str, float] = {}

    def mark() -> None:
        box["cpu"] = milter.cpu()
        box["machine"] = machine_cpu_seconds()

    res = run_load(milter.address, message, count, conc, CLIENT_IP, before_go=mark)
    cpu = milter.cpu() - box["cpu"]
    machine = machine_cpu_seconds() - box["machine"]
    n = max(res.messages, 1)
    return {
        "milter": milter.name,
        "label": label,
        "size": size,
        "concurrency": conc,
        "messages": res.messages,
        "signed": res.signed,
        "errors": res.errors,
        "first_error": res.first_error,
        "rate": res.rate,
        "elapsed": res.elapsed,
        "cpu_ms": cpu / n * 1000,
        "client_cpu_ms": res.client_cpu / n * 1000,
        "lat_p50_ms": _p(res.latencies, 0.5) * 1000,
        "lat_p99_ms": _p(res.latencies, 0.99) * 1000,
        "foreign_cores": max(0.0, machine - cpu - res.client_cpu) / max(res.elapsed, 1e-9),
    }


def run_milter(
    cfg: dict[str, Any], milters: list[Any], rss: dict[str, Any], record: bytes
) -> dict[str, Any]:
    from common import CLIENT_IP, median, verify
    from dkim_sidecar.milter.client import MilterClient
    from harness.procfs import socket_nodelay

    nodelay = {}
    for m in milters:
        with MilterClient(m.address) as c:
            c.negotiate()
            c.connect(CLIENT_IP)
            nodelay[m.name] = socket_nodelay(m.pid, m.port)
            from common import make_message

            r = c.send_message(make_message(4096))
            if not r.signatures or not verify(r.message, record):
                raise RuntimeError(f"{m.name} did not sign a message that verifies")
        log(f"{m.name}: signs, verified by dkimpy; TCP_NODELAY {nodelay[m.name]}")
    # warm-up, every kind of run once: threads, malloc arenas, caches
    for m in milters:
        for label, size, conc, count in cfg["milter"]:
            milter_run(m, label, size, conc, min(count, 100 if size < 1 << 20 else 20))
    main = milters[0]
    rss["samples_mb"].append(main.mem()["VmRSS"] / 1024)
    runs = []
    for rnd in range(1, cfg["rounds"] + 1):
        for label, size, conc, count in cfg["milter"]:
            order = milters if rnd % 2 else list(reversed(milters))
            for m in order:
                run = milter_run(m, label, size, conc, count)
                run["round"] = rnd
                runs.append(run)
                if m is main:
                    rss["messages"] += run["messages"]
                    rss["samples_mb"].append(main.mem()["VmRSS"] / 1024)
                log(
                    f"round {rnd} {m.name:8s} {label} c={conc:<2d} {run['rate']:7.1f} msg/s "
                    f"milter {run['cpu_ms']:.2f} ms/msg client {run['client_cpu_ms']:.2f} "
                    f"p50 {run['lat_p50_ms']:.1f} ms signed {run['signed']}/{run['messages']}"
                    f" other load {run['foreign_cores']:.2f} cores"
                )
        if rnd == 1:  # every kind of load has run at full size once: the baseline
            rss["baseline"] = len(rss["samples_mb"]) - 1
    summary: dict[str, Any] = {}

    def pick(name: str, label: str, conc: int, key: str) -> list[float]:
        return [
            r[key]
            for r in runs
            if r["milter"] == name and r["label"] == label and r["concurrency"] == conc
        ]

    tag = {"4 KB": "4k", "1 MB": "1m"}
    for m in milters:
        for label, _size, conc, _count in cfg["milter"]:
            t = tag[label]
            if conc == 16 or conc == max(c for _, _, c, _ in cfg["milter"]):
                summary[f"cpu_ms_{t}_{m.name}"] = median(pick(m.name, label, conc, "cpu_ms"))
                summary[f"rate_{t}_c16_{m.name}"] = median(pick(m.name, label, conc, "rate"))
            if conc == 1:
                summary[f"lat_ms_{t}_c1_{m.name}"] = median(pick(m.name, label, conc, "lat_p50_ms"))
                summary[f"cpu_ms_{t}_c1_{m.name}"] = median(pick(m.name, label, conc, "cpu_ms"))
    if len(milters) > 1:
        a, b = milters[0].name, milters[1].name
        for label, t in tag.items():
            ra, rb = pick(a, label, 16, "rate"), pick(b, label, 16, "rate")
            if ra and rb:
                summary[f"rate_ratio_{t}_c16"] = median(
                    [x / y for x, y in zip(ra, rb, strict=True)]
                )
    return {
        "runs": runs,
        "summary": summary,
        "nodelay": nodelay,
        "processes": min(max(c for _, _, c, _ in cfg["milter"]), 4),
    }


def postfix_map(work: Path, milter: Any) -> dict[str, str]:
    """main.cf for a Postfix that reaches `milter` only from its relay networks: the CIDR table
    made by `dkim-sidecar postfix-map` from that sidecar's own config, as docs/mailcow.md has
    admins do, and no smtpd_milters for everyone else (here there is no rspamd before it)."""
    table = work / f"{milter.name}.milter_map.cidr"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dkim_sidecar.cli",
            "postfix-map",
            "--config",
            str(work / milter.name / "config.yml"),
            "--milters",
            milter.address,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    table.write_text(out.stdout)
    os.chmod(table, 0o644)  # Postfix's smtpd (user postfix) reads it
    return {"smtpd_milters": "", "smtpd_milter_maps": f"cidr:{table}"}


def run_e2e(
    cfg: dict[str, Any],
    work: Path,
    modes: dict[str, Any],
    rss: dict[str, Any],
    record: bytes,
    main_cf: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    from common import machine_cpu_seconds, median
    from e2e import EndToEnd

    n, sessions = cfg["e2e_messages"], cfg["e2e_sessions"]
    runs: list[dict[str, Any]] = []
    main = modes.get("sidecar")
    with EndToEnd(work, modes, main_cf) as e:
        checks = 3
        check = e.start(record, checks)
        log(f"e2e: signed (dkimpy-verified) out of {checks} per setup: {check}")
        for mode, got in check.items():
            want = checks if mode in ("sidecar", "opendkim", "opendkim-nostall") else 0
            if got != want:
                raise RuntimeError(f"e2e setup {mode}: {got} of {checks} signed, expected {want}")
        # warm-up: smtpd processes, milter threads
        for mode in modes:
            e.run(mode, 50, sessions)
        names = list(modes)
        lat_modes = [m for m in ("none", "sidecar", "opendkim") if m in modes]
        for rnd in range(1, cfg["rounds"] + 1):
            k = (rnd - 1) % len(names)
            order = names[k:] + names[:k]
            plan = [(m, n, sessions) for m in order]
            plan += [(m, cfg["latency_messages"], 1) for m in lat_modes]
            for mode, count, s in plan:
                m0 = machine_cpu_seconds()
                res = e.run(mode, count, s)
                machine = machine_cpu_seconds() - m0
                run = {"round": rnd, **res.__dict__, "rate": res.rate}
                run["foreign_cores"] = max(0.0, machine - res.total_cpu) / max(res.drained, 1e-9)
                runs.append(run)
                if mode == "sidecar" and main is not None:
                    rss["messages"] += count
                    rss["samples_mb"].append(main.mem()["VmRSS"] / 1024)
                log(
                    f"round {rnd} e2e {mode:16s} s={s} {res.rate:7.1f} msg/s "
                    f"milter {res.milter_cpu / count * 1000:.2f} "
                    f"postfix {res.postfix_cpu / count * 1000:.2f} "
                    f"tools {res.tools_cpu / count * 1000:.2f} ms/msg "
                    f"other load {run['foreign_cores']:.2f} cores"
                )
    # ratios within each round
    for run in runs:
        base = [
            r["rate"]
            for r in runs
            if r["round"] == run["round"]
            and r["mode"] == "none"
            and r["sessions"] == run["sessions"]
        ]
        run["ratio"] = run["rate"] / base[0] if base else None
    summary: dict[str, Any] = {}
    for mode in modes:
        key = mode.replace("-", "_")
        main_runs = [r for r in runs if r["mode"] == mode and r["sessions"] == sessions]
        summary[f"rate_{key}"] = median([r["rate"] for r in main_runs])
        if mode != "none":
            summary[f"ratio_{key}"] = median([r["ratio"] for r in main_runs])
            summary[f"cpu_ms_{key}"] = median(
                [r["milter_cpu"] / r["messages"] * 1000 for r in main_runs]
            )
        summary[f"postfix_cpu_ms_{key}"] = median(
            [r["postfix_cpu"] / r["messages"] * 1000 for r in main_runs]
        )
        summary[f"tools_cpu_ms_{key}"] = median(
            [r["tools_cpu"] / r["messages"] * 1000 for r in main_runs]
        )
        lat = [r for r in runs if r["mode"] == mode and r["sessions"] == 1]
        if lat:
            summary[f"lat_ms_{key}"] = median([r["elapsed"] / r["messages"] * 1000 for r in lat])
    return {
        "runs": runs,
        "summary": summary,
        "messages": n,
        "sessions": sessions,
        "checks": checks,
        "check": check,
    }


def memory_one(milter: Any, size_mb: int, warmup: int) -> dict[str, Any]:
    from common import CLIENT_IP, make_message
    from dkim_sidecar.milter.client import split_header
    from milterload import one_connection

    small = split_header(make_message(4096))
    for i in range(warmup):
        one_connection(milter.address, CLIENT_IP, small[0], small[1], [f"W{i:05X}"])
    time.sleep(0.2)
    before = milter.mem()
    fields, body = split_header(make_message(size_mb << 20))
    cpu0 = milter.cpu()
    signed = one_connection(milter.address, CLIENT_IP, fields, body, ["BIG00001"])
    cpu = milter.cpu() - cpu0
    time.sleep(0.2)
    after = milter.mem()
    return {
        "signed": bool(signed),
        "hwm_before_mb": before["VmHWM"] / 1024,
        "hwm_after_mb": after["VmHWM"] / 1024,
        "hwm_growth_mb": (after["VmHWM"] - before["VmHWM"]) / 1024,
        "rss_before_mb": before["VmRSS"] / 1024,
        "rss_after_mb": after["VmRSS"] / 1024,
        "cpu_ms_per_mb": cpu * 1000 / size_mb,
    }


def run_memory(
    cfg: dict[str, Any], work: Path, keyfile: Path, have_opendkim: bool
) -> dict[str, Any]:
    from common import RELAY_NET, opendkim, sidecar

    out: dict[str, Any] = {"size_mb": cfg["memory_mb"], "warmup": 20}
    with sidecar(work, keyfile.parent, [RELAY_NET], name="sidecar-memory") as m:
        out["sidecar"] = memory_one(m, cfg["memory_mb"], out["warmup"])
    if have_opendkim:
        with opendkim(work, keyfile, [RELAY_NET], name="opendkim-memory") as m:
            out["opendkim"] = memory_one(m, cfg["memory_mb"], out["warmup"])
    for name in ("sidecar", "opendkim"):
        if name in out:
            v = out[name]
            log(
                f"memory {name}: {cfg['memory_mb']} MB message, VmHWM "
                f"{v['hwm_before_mb']:.1f} → {v['hwm_after_mb']:.1f} MB "
                f"(+{v['hwm_growth_mb']:.1f}), signed {v['signed']}"
            )
    return out


# --- profile -------------------------------------------------------------------------------


def run_profile(work: Path, keyfile: Path) -> None:
    """py-spy (wall, and GIL-holding only) on the milter under 4 KB and 1 MB load; the
    collapsed stacks go to bench/out/, the top frames to stdout."""
    import collections

    from common import RELAY_NET, sidecar

    spy = ROOT / ".venv" / "bin" / "py-spy"
    OUT.mkdir(exist_ok=True)
    with sidecar(work, keyfile.parent, [RELAY_NET]) as m:
        milter_run(m, "4 KB", 4096, 8, 100)
        for label, size, count in (("4k", 4096, 3000), ("1m", 1 << 20, 150)):
            for kind in ("wall", "gil"):
                path = OUT / f"profile-{label}-{kind}.txt"
                cmd = [str(spy), "record", "-p", str(m.pid), "-r", "250", "-f", "raw"]
                cmd += ["-o", str(path), "--nonblocking"] + (["--gil"] if kind == "gil" else [])
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                run = milter_run(m, label, size, 16, count)
                proc.send_signal(2)
                proc.wait(60)
                leaf: collections.Counter[str] = collections.Counter()
                incl: collections.Counter[str] = collections.Counter()
                total = 0
                for line in path.read_text().splitlines():
                    stack, _, num = line.rpartition(" ")
                    k = int(num)
                    total += k
                    frames = stack.split(";")
                    leaf[frames[-1] or "(no Python frame: C)"] += k
                    for f in set(frames):
                        incl[f] += k
                print(f"\n== {label} {kind}: {run['cpu_ms']:.2f} ms CPU/msg, {path}")
                for f, k in leaf.most_common(12):
                    print(f"  self {k / total * 100:5.1f}%  {f}")
                for f, k in incl.most_common(25):
                    if f:
                        print(f"  incl {k / total * 100:5.1f}%  {f}")


# --- main ----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short round, report in bench/out/")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--only", help=f"comma-separated sections of: {','.join(SECTIONS)}")
    ap.add_argument("--out", help="Markdown report (default docs/benchmarks.md; quick: bench/out)")
    ap.add_argument("--no-write", action="store_true", help="print only, write no report")
    ap.add_argument("--profile", action="store_true", help="only py-spy profiles of the milter")
    ap.add_argument("--from-json", help="only render the report again from a results.json")
    args = ap.parse_args()
    bootstrap()
    sys.path.insert(0, str(HERE))
    if args.from_json:
        return finish(json.loads(Path(args.from_json).read_text()), args)
    from common import (
        OPENDKIM,
        RELAY_NET,
        build_nostall,
        dns_record,
        machine_info,
        make_key,
        opendkim,
        sidecar,
    )

    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = sections - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    have_opendkim = Path(OPENDKIM).exists()
    notes: list[str] = []
    if not have_opendkim:
        notes.append("OpenDKIM is not installed (apt package opendkim): its columns are empty.")
    if "e2e" in sections and os.geteuid() != 0:
        sections.discard("e2e")
        notes.append("Not root: the end-to-end part (a real Postfix) was skipped.")

    started = time.monotonic()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "make bench" if not args.quick else ".venv/bin/python bench/run.py --quick"
    if args.only or args.rounds:
        command = "bench/run.py " + " ".join(sys.argv[1:])
    results: dict[str, Any] = {
        "date": date,
        "command": command,
        "mode": "quick" if args.quick else "full",
        "rounds": cfg["rounds"],
        "config": {k: v for k, v in cfg.items()},
        "machine": machine_info(),
        "load_before": loadavg(),
        "notes": notes,
    }
    log(f"bench: {results['mode']}, {cfg['rounds']} round(s), sections {sorted(sections)}")
    log(f"machine: {results['machine']['nproc']} x {results['machine']['cpu']}, load {loadavg()}")

    work = Path(tempfile.mkdtemp(prefix="dkim-bench-"))
    os.chmod(work, 0o755)  # Postfix's daemons must be able to search it (harness trap 1)
    try:
        keyfile, pem = make_key(work)
        record = dns_record(pem)
        if args.profile:
            run_profile(work, keyfile)
            shutil.rmtree(work, ignore_errors=True)
            return 0

        rss: dict[str, Any] = {"samples_mb": [], "messages": 0}
        foreign: list[tuple[float, float]] = []
        if "offline" in sections:
            results["offline"] = run_offline(cfg, pem)
        if "startup" in sections:
            results["startup"] = run_startup(cfg, work, keyfile, have_opendkim)
        if sections & {"milter", "e2e"}:
            with contextlib.ExitStack() as stack:
                relay = ["127.0.0.0/8", RELAY_NET]
                main_sc = stack.enter_context(sidecar(work, keyfile.parent, relay))
                milters = [main_sc]
                od = od_nostall = None
                if have_opendkim:
                    od = stack.enter_context(opendkim(work, keyfile, ["127.0.0.1", RELAY_NET]))
                    milters.append(od)
                    shim = build_nostall(work)
                    if shim is not None:  # OpenDKIM without its delayed-ACK waits
                        od_nostall = stack.enter_context(
                            opendkim(
                                work,
                                keyfile,
                                ["127.0.0.1", RELAY_NET],
                                name="opendkim-nostall",
                                preload=shim,
                            )
                        )
                        milters.append(od_nostall)
                if "milter" in sections:
                    results["milter"] = run_milter(cfg, milters, rss, record)
                    foreign += [
                        (r["foreign_cores"], r["elapsed"]) for r in results["milter"]["runs"]
                    ]
                if "e2e" in sections:
                    modes: dict[str, Any] = {"none": None, "sidecar": main_sc}
                    main_cf: dict[str, dict[str, str]] = {}
                    if od is not None:
                        modes["opendkim"] = od
                    outside = stack.enter_context(
                        sidecar(work, keyfile.parent, [RELAY_NET], name="sidecar-outside")
                    )
                    modes["sidecar-outside"] = outside
                    # the same sidecar, but Postfix asks it only for its relay networks
                    # (smtpd_milter_maps, as `dkim-sidecar postfix-map` writes the table)
                    modes["sidecar-mapped"] = outside
                    main_cf["sidecar-mapped"] = postfix_map(work, outside)
                    if have_opendkim:
                        modes["opendkim-outside"] = stack.enter_context(
                            opendkim(work, keyfile, [RELAY_NET], name="opendkim-outside")
                        )
                    if od_nostall is not None:
                        modes["opendkim-nostall"] = od_nostall
                    results["e2e"] = run_e2e(cfg, work, modes, rss, record, main_cf)
                    foreign += [(r["foreign_cores"], r["drained"]) for r in results["e2e"]["runs"]]
        if rss["samples_mb"]:
            s = rss["samples_mb"]
            rss["growth_mb"] = s[-1] - s[rss.get("baseline", 0)]
            results["rss"] = rss
        if "memory" in sections:
            results["memory"] = run_memory(cfg, work, keyfile, have_opendkim)
        if foreign:
            total = sum(t for _, t in foreign)
            results["foreign_cores"] = sum(c * t for c, t in foreign) / total if total else None
        results["load_after"] = loadavg()
        results["duration_s"] = time.monotonic() - started
    except BaseException:
        print(f"bench: stopped; logs and configs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)  # the key, spools and logs of this run
    return finish(results, args)


def finish(results: dict[str, Any], args: argparse.Namespace) -> int:
    import report

    results["floors"] = report.floors(results)
    OUT.mkdir(exist_ok=True)
    fc = results.get("foreign_cores")
    if not args.from_json and fc is not None and fc > 0.25:
        results["notes"].append(
            f"Other work used {fc:.2f} of the {results['machine']['nproc']} cores on average "
            "during the timed runs: rates (messages/s) are depressed and noisy; CPU per "
            "message and the ratios within a round are the steadier figures."
        )
    print()
    for f in results["floors"]:
        mark = {True: "met    ", False: "NOT MET", None: "?      "}[f["met"]]
        print(f"  {mark}  {f['goal']}: {f['text']}")
    if not args.from_json:
        (OUT / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if args.no_write:
        return 0
    if args.out:
        md = Path(args.out)
    elif args.quick:
        md = OUT / "benchmarks-quick.md"
    else:
        md = ROOT / "docs" / "benchmarks.md"
    png = md.with_suffix(".png")
    has_chart = report.chart(results, png)
    md.write_text(report.markdown(results, png.name if has_chart else None))
    log(f"wrote {md}" + (f" and {png}" if has_chart else " (no chart: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
