"""The results as Markdown (docs/benchmarks.md) and a chart (docs/benchmarks.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import median

TIMES = "\u00d7"  # the multiplication sign
DASH = "\u2013"  # an en dash: no value


def fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    if value is None or value != value:  # None or NaN
        return DASH
    return f"{value:.{digits}f}{unit}"


def ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return a / b


def _ratio(summary: dict[str, Any], a: str, b: str) -> float | None:
    x, y = summary.get(a), summary.get(b)
    return x / y if x is not None and y else None


def floors(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of the issue: what was measured, the floor, met or not."""
    out = []

    def add(goal: str, value: float | None, floor: float, higher: bool, text: str) -> None:
        met = None if value is None else (value >= floor if higher else value <= floor)
        out.append({"goal": goal, "value": value, "floor": floor, "met": met, "text": text})

    e2e = r.get("e2e", {}).get("summary", {})
    add(
        "end to end, signing every message, vs no milter",
        e2e.get("ratio_sidecar"),
        0.6,
        True,
        f"{fmt(e2e.get('ratio_sidecar'))}{TIMES} (floor ≥ 0.6{TIMES}; OpenDKIM "
        f"{fmt(e2e.get('ratio_opendkim'))}{TIMES}, without its TCP stalls "
        f"{fmt(e2e.get('ratio_opendkim_nostall'))}{TIMES})",
    )
    add(
        "end to end, clients outside the relay networks, vs no milter",
        e2e.get("ratio_sidecar_outside"),
        0.95,
        True,
        f"{fmt(e2e.get('ratio_sidecar_outside'))}{TIMES} (floor ≥ 0.95{TIMES}; the sidecar "
        "steps aside at connect)",
    )
    add(
        "same, with `smtpd_milter_maps` from `dkim-sidecar postfix-map`",
        e2e.get("ratio_sidecar_mapped"),
        0.95,
        True,
        f"{fmt(e2e.get('ratio_sidecar_mapped'))}{TIMES} (floor ≥ 0.95{TIMES}; Postfix does not "
        f"contact the sidecar: milter CPU {fmt(e2e.get('cpu_ms_sidecar_mapped'))} ms/msg)",
    )
    ml = r.get("milter", {}).get("summary", {})
    nostall_rate_ratio = _ratio(ml, "rate_4k_c16_sidecar", "rate_4k_c16_opendkim-nostall")
    add(
        "milter CPU per signed 4 KB message",
        ml.get("cpu_ms_4k_sidecar"),
        1.0,
        False,
        f"{fmt(ml.get('cpu_ms_4k_sidecar'))} ms (floor ≤ 1.0 ms; OpenDKIM "
        f"{fmt(ml.get('cpu_ms_4k_opendkim'))} ms)",
    )
    add(
        "milter CPU per signed 1 MB message",
        ml.get("cpu_ms_1m_sidecar"),
        2.5,
        False,
        f"{fmt(ml.get('cpu_ms_1m_sidecar'))} ms (floor ≤ 2.5 ms; OpenDKIM "
        f"{fmt(ml.get('cpu_ms_1m_opendkim'))} ms)",
    )
    add(
        "messages/s at concurrency 16 (4 KB) vs OpenDKIM, same client",
        ml.get("rate_ratio_4k_c16"),
        1.5,
        True,
        f"{fmt(ml.get('rate_ratio_4k_c16'))}{TIMES} (floor ≥ 1.5{TIMES}; against OpenDKIM "
        f"without its waits {fmt(nostall_rate_ratio)}{TIMES})",
    )
    mem = r.get("memory", {})
    add(
        "peak memory growth signing one 50 MB message",
        mem.get("sidecar", {}).get("hwm_growth_mb"),
        5.0,
        False,
        f"{fmt(mem.get('sidecar', {}).get('hwm_growth_mb'), 1)} MB (floor ≤ 5 MB; OpenDKIM "
        f"{fmt(mem.get('opendkim', {}).get('hwm_growth_mb'), 1)} MB)",
    )
    rss = r.get("rss", {})
    add(
        "steady RSS under sustained load (VmRSS growth after the first round)",
        rss.get("growth_mb"),
        2.0,
        False,
        f"{fmt(rss.get('growth_mb'), 1)} MB over {rss.get('messages', 0)} messages (floor ≤ 2 MB)",
    )
    st = r.get("startup", {})
    add(
        "start-up: listening after start",
        st.get("sidecar_s"),
        1.0,
        False,
        f"{fmt(st.get('sidecar_s'))} s (floor ≤ 1 s; OpenDKIM {fmt(st.get('opendkim_s'))} s)",
    )
    off = r.get("offline", {}).get("summary", {})
    add(
        "offline signer vs dkimpy `dkim.sign`, 4 KB, RSA-2048",
        off.get("ratio_4k"),
        20.0,
        True,
        f"{fmt(off.get('ratio_4k'), 1)}{TIMES} (floor ≥ 20{TIMES})",
    )
    return [f for f in out if f["value"] is not None]


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: DASH}[met]


def markdown(r: dict[str, Any], chart: str | None) -> str:
    info = r["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured {r['date']} with `{r['command']}` ({r['mode']} run, {r['rounds']} "
        f"interleaved round{'s' if r['rounds'] != 1 else ''}, medians; {r['duration_s']:.0f} s).",
        "",
        f"Machine: {info['nproc']} {TIMES} {info['cpu']}, {info['memory']}, "
        f"Linux {info['kernel']}; "
        f"Python {info['python']}, {info['openssl']}, cryptography {info['cryptography']}, "
        f"dkimpy {info['dkimpy']}, {info['opendkim']}, "
        f"Postfix {info['postfix']}; commit {info['commit']}. Load average at start "
        f"{r['load_before']}, at end {r['load_after']}; CPU used by other work on the "
        f"machine while the timed runs ran: {fmt(r.get('foreign_cores'), 2)} cores on average.",
        "",
        "Reproduce: `make bench` (everything, 5-10 min) or `.venv/bin/python bench/run.py "
        "--quick` (~1 min, report in bench/out/); `bench/run.py --profile` writes py-spy "
        "profiles of the milter under 4 KB and 1 MB load to bench/out/. Both milters sign "
        "with the same RSA-2048 key, relaxed/relaxed, the same messages and the same client, "
        "one after the other in each round. OpenDKIM runs as `opendkim -f -x CONF` with "
        "`Mode s`, `Domain`/`Selector`/`KeyFile`, `Canonicalization relaxed/relaxed`, "
        "`OversignHeaders From`, `InternalHosts` = the relay networks, `Socket "
        "inet:PORT@127.0.0.1`, `Syslog no`; dkim-sidecar with its defaults (log level info: "
        "one log line per message).",
        "",
        "## Goals",
        "",
        "| goal | measured | |",
        "|---|---|---|",
    ]
    for f in r["floors"]:
        lines.append(f"| {f['goal']} | {f['text']} | {_mark(f['met'])} |")
    lines += ["", *_side_by_side(r)]
    if chart:
        lines += ["", f"![messages/s and CPU per message]({chart})"]
    lines += _sections(r)
    return "\n".join(lines) + "\n"


def _side_by_side(r: dict[str, Any]) -> list[str]:
    ml = r.get("milter", {}).get("summary", {})
    e2e = r.get("e2e", {}).get("summary", {})
    mem = r.get("memory", {})
    lim = r.get("offline", {}).get("limits", {})
    rsa = lim.get("rsa_sign_ms")
    sha = lim.get("sha256_mb_s")
    ns = "opendkim-nostall"  # OpenDKIM with bench/nostall.c: its delayed-ACK waits removed

    def ms(value: float | None) -> str:
        return fmt(value) if value is None else f"{fmt(value)} ms"

    def x(value: float | None) -> str:
        return fmt(value) if value is None else f"{fmt(value)}{TIMES}"

    def n(value: float | None) -> str:
        return fmt(value, 0)

    rows = [
        (
            "milter CPU per signed 4 KB message",
            ms(ml.get("cpu_ms_4k_sidecar")),
            ms(ml.get("cpu_ms_4k_opendkim")),
            ms(ml.get(f"cpu_ms_4k_{ns}")),
            f"RSA-2048 sign {fmt(rsa)} ms",
        ),
        (
            "milter CPU per signed 1 MB message",
            ms(ml.get("cpu_ms_1m_sidecar")),
            ms(ml.get("cpu_ms_1m_opendkim")),
            ms(ml.get(f"cpu_ms_1m_{ns}")),
            f"SHA-256 {fmt(sha, 0)} MB/s → {fmt(1000 / sha if sha else None)} ms (+ RSA)",
        ),
        (
            "same (4 KB), one connection at a time",
            ms(ml.get("cpu_ms_4k_c1_sidecar")),
            ms(ml.get("cpu_ms_4k_c1_opendkim")),
            ms(ml.get(f"cpu_ms_4k_c1_{ns}")),
            "",
        ),
        (
            "milter CPU per message, Postfix end to end, 4 KB",
            ms(e2e.get("cpu_ms_sidecar")),
            ms(e2e.get("cpu_ms_opendkim")),
            ms(e2e.get("cpu_ms_opendkim_nostall")),
            "",
        ),
        (
            "messages/s, milter protocol, 4 KB, concurrency 16",
            n(ml.get("rate_4k_c16_sidecar")),
            n(ml.get("rate_4k_c16_opendkim")),
            n(ml.get(f"rate_4k_c16_{ns}")),
            "",
        ),
        (
            "messages/s, milter protocol, 1 MB, concurrency 16",
            n(ml.get("rate_1m_c16_sidecar")),
            n(ml.get("rate_1m_c16_opendkim")),
            n(ml.get(f"rate_1m_c16_{ns}")),
            "",
        ),
        (
            "latency per message, milter protocol, 4 KB, one at a time",
            ms(ml.get("lat_ms_4k_c1_sidecar")),
            ms(ml.get("lat_ms_4k_c1_opendkim")),
            ms(ml.get(f"lat_ms_4k_c1_{ns}")),
            "",
        ),
        (
            "peak memory growth signing one 50 MB message",
            f"{fmt(mem.get('sidecar', {}).get('hwm_growth_mb'), 1)} MB",
            f"{fmt(mem.get('opendkim', {}).get('hwm_growth_mb'), 1)} MB",
            "",
            "0",
        ),
        (
            "end to end through Postfix, `smtp-source -s 8 -l 4096`, vs no milter "
            f"({fmt(e2e.get('rate_none'), 0)}/s)",
            x(e2e.get("ratio_sidecar")),
            x(e2e.get("ratio_opendkim")),
            x(e2e.get("ratio_opendkim_nostall")),
            f"1.0{TIMES}",
        ),
        (
            "same, clients outside the relay networks",
            x(e2e.get("ratio_sidecar_outside")),
            x(e2e.get("ratio_opendkim_outside")),
            "",
            f"1.0{TIMES}",
        ),
        (
            "same, with `smtpd_milter_maps` (`dkim-sidecar postfix-map`)",
            x(e2e.get("ratio_sidecar_mapped")),
            "",
            "",
            f"1.0{TIMES}",
        ),
        (
            f"end to end, one session, latency per message (no milter "
            f"{fmt(e2e.get('lat_ms_none'))} ms)",
            ms(e2e.get("lat_ms_sidecar")),
            ms(e2e.get("lat_ms_opendkim")),
            "",
            "",
        ),
        (
            "start-up until listening",
            f"{fmt(r.get('startup', {}).get('sidecar_s'))} s",
            f"{fmt(r.get('startup', {}).get('opendkim_s'))} s",
            "",
            "",
        ),
    ]
    lines = [
        "## Side by side",
        "",
        "OpenDKIM, no waits: the same OpenDKIM with bench/nostall.c loaded (LD_PRELOAD), which "
        "sets TCP_NODELAY and TCP_QUICKACK on its sockets: without the two ~40 ms waits on "
        "delayed ACKs that libmilter's writes and its skipped DATA step cause, it shows what "
        "its CPU allows.",
        "",
        "| | dkim-sidecar | OpenDKIM | OpenDKIM, no waits | limit |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _sections(r: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    ml = r.get("milter")
    if ml:
        lines += [
            "",
            "## Milter protocol (bench/milterload.py)",
            "",
            "Our MTA-side client (`dkim_sidecar.milter.client.MilterClient`) in "
            f"{ml['processes']} processes; a new milter connection for every message "
            "(negotiate, connect, MAIL, RCPT, DATA, header, end of header, body in 64 KB "
            "chunks, end of message, QUIT), as Postfix's smtpd does for one message per SMTP "
            "session. Milter CPU = utime+stime of the milter process (/proc/PID/stat) over the "
            "run / messages; client CPU likewise for the client processes. Every message of "
            "every run came back signed unless the table says otherwise.",
            "",
        ]
        rows = []
        for run in ml["runs"]:
            rows.append(
                [
                    str(run["round"]),
                    run["milter"],
                    run["label"],
                    str(run["concurrency"]),
                    str(run["messages"]),
                    f"{run['signed']}" + (f" ({run['errors']} errors)" if run["errors"] else ""),
                    fmt(run["rate"], 0),
                    fmt(run["cpu_ms"]),
                    fmt(run["client_cpu_ms"]),
                    fmt(run["lat_p50_ms"]),
                    fmt(run["lat_p99_ms"]),
                    fmt(run["foreign_cores"]),
                ]
            )
        lines += _table(
            [
                "round",
                "milter",
                "message",
                "conc.",
                "messages",
                "signed",
                "msg/s",
                "milter CPU ms/msg",
                "client CPU ms/msg",
                "p50 ms",
                "p99 ms",
                "other load (cores)",
            ],
            rows,
        )
        nd = ml.get("nodelay", {})
        if nd:
            lines += [
                "",
                "TCP_NODELAY, read with getsockopt() on copies of the milter's own sockets "
                "(pidfd_getfd) while a client is connected:",
                "",
            ]
            for name, socks in nd.items():
                text = ", ".join(f"{kind} {'on' if on else 'off'}" for kind, on in socks)
                lines.append(f"- {name}: {text}")
            sm = ml["summary"]
            lat_s, lat_o = sm.get("lat_ms_4k_c1_sidecar"), sm.get("lat_ms_4k_c1_opendkim")
            if lat_s is not None and lat_o is not None:
                lines += [
                    "",
                    f"One message at a time, a 4 KB message takes {fmt(lat_s)} ms with "
                    f"dkim-sidecar and {fmt(lat_o)} ms with OpenDKIM: a milter that writes its "
                    "replies in several small writes with Nagle on waits for the MTA's delayed "
                    "ACK (about 40 ms). At concurrency 16 that wait, not CPU, bounds OpenDKIM's "
                    "rate (16 / its p50 latency).",
                ]
    e2e = r.get("e2e")
    if e2e:
        lines += [
            "",
            "## End to end through Postfix (bench/e2e.py)",
            "",
            "One throwaway Postfix per setup (tests/harness/postfix.py), "
            f"`smtp-source -s {e2e['sessions']} -m {e2e['messages']} -l 4096` into it, relayed "
            "to Postfix's `smtp-sink`. Rate = messages / `smtp-source` wall time; every run "
            "then waits for the queue to empty. Ratios are taken within each round and the "
            "median is reported. CPU columns: milter, the Postfix instance (all its "
            "processes), `smtp-source` + `smtp-sink`. Before timing, each setup relayed "
            f"{e2e['checks']} messages into a byte-exact sink and dkimpy verified them: "
            + ", ".join(f"{k} {v}/{e2e['checks']} signed" for k, v in e2e["check"].items())
            + ".",
            "",
        ]
        rows = []
        for run in e2e["runs"]:
            n = run["messages"]
            rows.append(
                [
                    str(run["round"]),
                    run["mode"],
                    str(run["sessions"]),
                    str(n),
                    fmt(run["rate"], 0),
                    fmt(run["ratio"]),
                    fmt(run["milter_cpu"] / n * 1000),
                    fmt(run["postfix_cpu"] / n * 1000),
                    fmt(run["tools_cpu"] / n * 1000),
                    fmt(run["elapsed"] / n * run["sessions"] * 1000),
                    fmt(run["foreign_cores"]),
                ]
            )
        lines += _table(
            [
                "round",
                "setup",
                "sessions",
                "messages",
                "msg/s",
                "vs none",
                "milter CPU ms/msg",
                "Postfix CPU ms/msg",
                "tools CPU ms/msg",
                "ms per message per session",
                "other load (cores)",
            ],
            rows,
        )
        lines += _budget(e2e["summary"])
    mem = r.get("memory")
    if mem:
        lines += [
            "",
            "## Memory",
            "",
            f"A fresh milter process, {mem['warmup']} small messages to warm it up, then one "
            f"message with a {mem['size_mb']} MB body; VmHWM (peak RSS) and VmRSS from "
            "/proc/PID/status before and after.",
            "",
        ]
        rows = []
        for name in ("sidecar", "opendkim"):
            m = mem.get(name)
            if m:
                rows.append(
                    [
                        name,
                        "yes" if m["signed"] else "**no**",
                        fmt(m["hwm_before_mb"], 1),
                        fmt(m["hwm_after_mb"], 1),
                        fmt(m["hwm_growth_mb"], 1),
                        fmt(m["rss_after_mb"], 1),
                        fmt(m["cpu_ms_per_mb"]),
                    ]
                )
        lines += _table(
            [
                "milter",
                "signed",
                "VmHWM before MB",
                "VmHWM after MB",
                "growth MB",
                "VmRSS after MB",
                "CPU ms per MB",
            ],
            rows,
        )
    rss = r.get("rss")
    if rss:
        lines += [
            "",
            "Steady state: VmRSS (MB) of the benchmark's long-running dkim-sidecar after "
            f"the warm-up and after each of its runs ({rss['messages']} messages in all; the "
            "growth is counted from the end of the first round, once every kind of load has "
            "run at full size, so that thread stacks and malloc arenas are in place): "
            + ", ".join(
                ("**" + fmt(v, 1) + "**") if i == rss.get("baseline", 0) else fmt(v, 1)
                for i, v in enumerate(rss["samples_mb"])
            )
            + ".",
        ]
    off = r.get("offline")
    if off:
        lines += [
            "",
            "## Offline signing (bench/offline.py)",
            "",
            "In one process, the same message and key: `MessageSigner` (what the milter runs, "
            "without the protocol) against dkimpy's `dkim.sign`, relaxed/relaxed; signatures "
            "per CPU second, median of the rounds.",
            "",
        ]
        rows = []
        for label, v in off["summary"]["by_size"].items():
            rows.append(
                [
                    label,
                    fmt(v["sidecar"], 0),
                    fmt(1000 / v["sidecar"] if v["sidecar"] else None),
                    fmt(v["dkimpy"], 1),
                    fmt(1000 / v["dkimpy"] if v["dkimpy"] else None),
                    fmt(v["ratio"], 1) + TIMES,
                ]
            )
        lines += _table(
            ["message", "sidecar sig/s", "ms/sig", "dkimpy sig/s", "ms/sig", "ratio"], rows
        )
        lim = off.get("limits", {})
        lines += [
            "",
            f"Limits in the same run: one RSA-2048 signature {fmt(lim.get('rsa_sign_ms'), 3)} "
            f"ms (cryptography/OpenSSL), SHA-256 {fmt(lim.get('sha256_mb_s'), 0)} MB/s.",
        ]
    st = r.get("startup")
    if st:
        lines += [
            "",
            "## Start-up",
            "",
            "Spawn to first accepted TCP connection on the milter port, polled every 2 ms; "
            f"median of {len(st['sidecar_runs'])}: dkim-sidecar "
            + ", ".join(fmt(v, 3) for v in st["sidecar_runs"])
            + " s; OpenDKIM "
            + ", ".join(fmt(v, 3) for v in st.get("opendkim_runs", []))
            + " s.",
        ]
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return lines


def _budget(sm: dict[str, Any]) -> list[str]:
    """Where the CPU of one message goes end to end, and what that allows on this machine."""
    need = ("postfix_cpu_ms_none", "tools_cpu_ms_none", "postfix_cpu_ms_sidecar")
    if any(sm.get(k) is None for k in need):
        return []
    base = sm["postfix_cpu_ms_none"] + sm["tools_cpu_ms_none"]
    pf = sm["postfix_cpu_ms_sidecar"] + sm.get("tools_cpu_ms_sidecar", 0.0)
    ours = sm.get("cpu_ms_sidecar") or 0.0
    text = (
        f"CPU per message end to end (medians): without a milter Postfix used "
        f"{fmt(sm['postfix_cpu_ms_none'])} ms and smtp-source + smtp-sink "
        f"{fmt(sm['tools_cpu_ms_none'])} ms. With dkim-sidecar signing, Postfix's own "
        f"processes used {fmt(sm['postfix_cpu_ms_sidecar'])} ms"
    )
    if sm.get("postfix_cpu_ms_opendkim") is not None:
        text += f" (with OpenDKIM {fmt(sm['postfix_cpu_ms_opendkim'])} ms)"
    text += (
        f" and the milter {fmt(ours)} ms. When the machine is CPU-bound the ratio is at most "
        f"{fmt(base / (pf + ours))}{TIMES} with these figures, and "
        f"{fmt(base / pf)}{TIMES} with a milter that cost nothing: Postfix's side of the "
        "milter protocol is part of the price."
    )
    out = ["", text]
    if sm.get("ratio_opendkim_nostall") is not None:
        out += [
            "",
            f"OpenDKIM's {fmt(sm.get('ratio_opendkim'))}{TIMES} is its delayed-ACK waits "
            "(about 40 ms twice a message). "
            "With them removed (bench/nostall.c, loaded into it with LD_PRELOAD, sets "
            "TCP_NODELAY and TCP_QUICKACK on its sockets) it is CPU-bound: "
            f"{fmt(sm['ratio_opendkim_nostall'])}{TIMES} the no-milter rate, with "
            f"{fmt(sm.get('cpu_ms_opendkim_nostall'))} ms of milter CPU and "
            f"{fmt(sm.get('postfix_cpu_ms_opendkim_nostall'))} ms of Postfix CPU per message: "
            "the figure to hold dkim-sidecar's ratio against.",
        ]
    if sm.get("postfix_cpu_ms_sidecar_outside") is not None:
        pfo = sm["postfix_cpu_ms_sidecar_outside"] + sm.get("tools_cpu_ms_sidecar_outside", 0.0)
        mo = sm.get("cpu_ms_sidecar_outside") or 0.0
        out += [
            "",
            f"Clients outside the relay networks: Postfix used "
            f"{fmt(sm['postfix_cpu_ms_sidecar_outside'])} ms per message (without a milter "
            f"{fmt(sm['postfix_cpu_ms_none'])} ms) and the milter {fmt(mo)} ms: "
            f"at most {fmt(base / (pfo + mo))}{TIMES} when CPU-bound, "
            f"{fmt(base / pfo)}{TIMES} with a milter that cost nothing. With "
            "`smtpd_milter_maps` (the table `dkim-sidecar postfix-map` writes), Postfix opens "
            "no milter connection for these sessions at all (tests/system/test_postfix.py "
            "checks that the sidecar is never reached): measured above as `sidecar-mapped`, "
            f"{fmt(sm.get('ratio_sidecar_mapped'))}{TIMES}.",
        ]
    return out


def chart(r: dict[str, Any], path: Path) -> bool:
    """Messages/s and milter CPU per message, side by side; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ml = r.get("milter", {}).get("summary", {})
    e2e = r.get("e2e", {}).get("summary", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = ["milter 4 KB\nconc. 16", "milter 1 MB\nconc. 16", "Postfix e2e 4 KB\n8 sessions"]
    series = {
        "dkim-sidecar": [
            ml.get("rate_4k_c16_sidecar"),
            ml.get("rate_1m_c16_sidecar"),
            e2e.get("rate_sidecar"),
        ],
        "OpenDKIM": [
            ml.get("rate_4k_c16_opendkim"),
            ml.get("rate_1m_c16_opendkim"),
            e2e.get("rate_opendkim"),
        ],
        "dkim-sidecar, client outside relay networks": [
            None,
            None,
            e2e.get("rate_sidecar_outside"),
        ],
        "no milter": [None, None, e2e.get("rate_none")],
    }
    colors = {
        "dkim-sidecar": "#2b7bba",
        "OpenDKIM": "#e08214",
        "dkim-sidecar, client outside relay networks": "#9ecae1",
        "no milter": "#999999",
    }
    _bars(ax1, groups, series, colors)
    ax1.set_ylabel("messages/s (higher is better)")
    ax1.set_title("Throughput")
    groups2 = ["4 KB", "1 MB", "Postfix e2e 4 KB"]
    series2 = {
        "dkim-sidecar": [
            ml.get("cpu_ms_4k_sidecar"),
            ml.get("cpu_ms_1m_sidecar"),
            e2e.get("cpu_ms_sidecar"),
        ],
        "OpenDKIM": [
            ml.get("cpu_ms_4k_opendkim"),
            ml.get("cpu_ms_1m_opendkim"),
            e2e.get("cpu_ms_opendkim"),
        ],
    }
    _bars(ax2, groups2, series2, colors)
    for x, y in ((0, 1.0), (1, 2.5), (2, 1.0)):
        ax2.hlines(y, x - 0.45, x + 0.45, color="#333333", linewidth=1.2, linestyle="--")
        ax2.annotate(f"floor {y:g} ms", (x + 0.45, y), ha="right", va="bottom", fontsize=7)
    ax2.set_ylabel("milter CPU ms per signed message (lower is better)")
    ax2.set_title("Milter CPU per message")
    fig.suptitle(f"dkim-sidecar vs OpenDKIM, RSA-2048 ({r['date']}, {r['machine']['nproc']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bars(ax: Any, groups: list[str], series: dict[str, list[Any]], colors: dict[str, str]) -> None:
    # per group, only the series that have a value there, centred on the group
    width = 0.8 / max(len(series), 1)
    labelled: set[str] = set()
    for g in range(len(groups)):
        present = [name for name, values in series.items() if values[g]]
        for i, name in enumerate(present):
            v = series[name][g]
            x = g + (i - (len(present) - 1) / 2) * width
            ax.bar(x, v, width, color=colors[name], label=None if name in labelled else name)
            labelled.add(name)
            ax.annotate(
                f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}",
                (x, v),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.legend(fontsize=8)


def summarize_median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return median(vals) if vals else None
