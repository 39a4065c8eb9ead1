"""A throwaway, real rspamd configured like Mailcow's, for tests (runs as root, loopback only).

What it is for: rspamd sits FIRST in Mailcow's ``smtpd_milters``, so it decides what the
sidecar ever gets to see. `Rspamd` starts Debian's ``rspamd`` binary with a configuration
written here (never the host's /etc/rspamd), on free 127.0.0.1 ports: a ``normal`` worker that
scans and a ``rspamd_proxy`` worker with ``milter = yes`` in front of it, which is what
Postfix talks to (Mailcow: ``inet:rspamd:9900``). Redis (keys, domain list, forwarding hosts)
is the test's `harness.redis.RedisServer`; DNS is the test's `harness.dnsserver.TxtServer`.

The rules are Mailcow's, restated in our own words from mailcow/mailcow-dockerized
``data/conf/rspamd`` (local.d/options.inc, actions.conf, composites.conf, multimap.conf,
force_actions.conf, dkim_signing.conf, milter_headers.conf, groups.conf, policies_group.conf,
override.d/worker-proxy.inc, override.d/worker-normal.inc and lua/rspamd.local.lua):

- ``local_addrs`` = Mailcow's own Docker networks only: any other client,
  a printer in Postfix's ``mynetworks`` included, is an outside client to rspamd.
- SPF, DKIM (verification), DMARC with Mailcow's scores (R_SPF_FAIL 8, DMARC_POLICY_REJECT 16,
  ...); actions reject 15, add header 8, greylist 7.
- The multimaps the composites need: WHITELISTED_FWD_HOST (Redis hash, by address and every
  enclosing prefix), MAILCOW_DOMAIN_HEADER_FROM (From domain in Redis DOMAIN_MAP), SIEVE_HOST
  and RSPAMD_HOST (Mailcow's dovecot and rspamd containers, from files).
- MAILCOW_AUTH (an SMTP-authenticated client, -20) and KEEP_SPAM (a forwarding host with the
  spam filter off: accepted before any check) in our own Lua; MAILCOW_WHITE (Mailcow's
  per-domain whitelist settings) as a symbol nothing sets here, so that the composites read as
  Mailcow's do.
- The composites SPOOFED_UNAUTH (+50) and WL_FWD_HOST (a forwarding host's failing policy
  results dropped), and the forced action that turns a forwarding host's reject into
  "add header".
- dkim_signing as Mailcow has it: authenticated and local clients only, keys from Redis
  (DKIM_PRIV_KEYS / DKIM_SELECTORS), the envelope domain (the From domain for sign_networks).
- milter_headers: X-Spamd-Result and Authentication-Results, not for authenticated clients.

Deliberately not loaded: every module that needs the Internet or other Mailcow containers
(RBLs, fuzzy, ClamAV, olefy, bayes, ratelimit, neural, greylisting, the stock regexp rules).
Only the Lua plugins configured below run, because rspamd loads a plugin only when the
configuration has a section for it (or lists it in ``explicit_modules``); the plugin code
itself is the package's, under /usr/share/rspamd.

Traps found while building this (rspamd 3.4, Debian bookworm):

1. rspamd refuses to run workers as root ("cannot run rspamd workers as root user"):
   ``-u _rspamd -g _rspamd`` (the package's user). The workers read the map files as that
   user and write the pid, cache and log files, so the base directory is 0755 and the
   run/db/log directories belong to ``_rspamd``; the file with the Redis password is
   0640 root:_rspamd, readable by nobody else.
2. The main process binds the listening sockets before it forks the workers, so a port that
   accepts a TCP connection proves nothing: readiness is an HTTP ``/ping`` answered by the
   normal worker and a milter option negotiation answered by the proxy.
3. A client on 127.0.0.1 is always "local" to rspamd (loopback counts, whatever
   ``local_addrs`` says): tests present other addresses with Postfix's XCLIENT.
4. The proxy learns the authenticated user only from the ``{auth_authen}`` macro, which
   Postfix sends at MAIL only if ``milter_mail_macros`` lists it (Mailcow's list does).
5. Nothing under /etc/rspamd is read: traced, the only attempts are Lua ``require`` lookups
   in /etc/rspamd/lua/, a search path compiled into the binary (``--var=CONFDIR`` does not
   move it), where the Debian package installs nothing; the modules then load from
   /usr/share/rspamd.
6. Hyperscan compiles the public suffix list (``url_tld``) into ``hs_cache_dir`` at the first
   start: ~15 s for the package's full list. A list of the few suffixes the tests use is
   compiled at once.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dkim_sidecar.milter.client import MilterClient

from .postfix import free_port
from .procfs import group_members

__all__ = [
    "RSPAMD",
    "Rspamd",
    "RspamdResult",
    "rspamd_available",
]

RSPAMD = "/usr/bin/rspamd"
USER = "_rspamd"

# The public suffixes rspamd knows here (url_tld): enough for the tests' domains.
TLDS = ("com", "net", "org", "example", "test")

# The reply text of the proxy's reject (Postfix prefixes "554 5.7.1"). Mailcow words its own.
REJECT_MESSAGE = "Rejected by the test Mailcow's spam filter"


def rspamd_available() -> bool:
    return os.path.isfile(RSPAMD) and os.access(RSPAMD, os.X_OK)


@dataclass(frozen=True)
class RspamdResult:
    """One scan, from the line ``log_format`` below writes per message."""

    message_id: str
    queue_id: str
    ip: str
    user: str
    action: str
    score: float
    required: float
    symbols: dict[str, float]

    def has(self, symbol: str) -> bool:
        return symbol in self.symbols


# One line per scanned message, easy to parse: fields separated by " | ", symbols as
# NAME(score) comma-separated ($symbols_scores).
_LOG_FORMAT = (
    "SCAN mid=<$mid> | qid=<$qid> | ip=$ip | user=$user | action=$action | "
    "scores=$scores | symbols=$symbols_scores"
)
_SCAN_RE = re.compile(
    r"SCAN mid=<(?P<mid>[^>]*)> \| qid=<(?P<qid>[^>]*)> \| ip=(?P<ip>\S*) \| user=(?P<user>\S*) "
    r"\| action=(?P<action>[^|]*?) \| scores=(?P<score>-?[\d.]+)/(?P<required>-?[\d.]+) "
    r"\| symbols=(?P<symbols>.*)$"
)
_SYMBOL_RE = re.compile(r"([A-Z0-9_]+)\((-?[\d.]+)\)")


def _reap(pid: int) -> None:
    """Last resort (garbage collection, interpreter exit): kill the process group we made."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class Rspamd:
    """One rspamd (main process + a normal and a proxy worker) under a temp directory.

    ``redis``: (host, port, password) of the Redis that Mailcow's rspamd shares with the UI.
    ``nameserver``: (host, port) of the DNS server rspamd asks (SPF, DMARC, DKIM keys).
    ``local_networks``: Mailcow's own networks (its ``local_addrs``).
    ``sieve_hosts``, ``rspamd_hosts``: the addresses of Mailcow's dovecot and rspamd
    containers (SIEVE_HOST, RSPAMD_HOST; dovecot's is also dkim_signing's sign_networks).
    """

    def __init__(
        self,
        *,
        redis: tuple[str, int, str],
        nameserver: tuple[str, int],
        local_networks: Sequence[str] = ("172.22.1.0/24", "fd4d:6169:6c63:6f77::/64"),
        sieve_hosts: Sequence[str] = ("172.22.1.250/32",),
        rspamd_hosts: Sequence[str] = ("172.22.1.251/32",),
        start_timeout: float = 60.0,
    ) -> None:
        self.redis = redis
        self.nameserver = nameserver
        self.local_networks = tuple(local_networks)
        self.sieve_hosts = tuple(sieve_hosts)
        self.rspamd_hosts = tuple(rspamd_hosts)
        self.start_timeout = start_timeout
        self.base = Path(tempfile.mkdtemp(prefix="rspamd-harness-"))
        os.chmod(self.base, 0o755)  # trap 1
        self.milter_port = 0
        self.normal_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- paths ---------------------------------------------------------------------------

    @property
    def conf_path(self) -> Path:
        return self.base / "rspamd.conf"

    @property
    def log_path(self) -> Path:
        return self.base / "log" / "rspamd.log"

    @property
    def milter(self) -> str:
        """The milter address for Postfix's smtpd_milters."""
        return f"inet:127.0.0.1:{self.milter_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- configuration -------------------------------------------------------------------

    def write_config(self) -> None:
        uid = pwd.getpwnam(USER).pw_uid
        gid = grp.getgrnam(USER).gr_gid
        for sub in ("run", "db", "log"):
            d = self.base / sub
            d.mkdir(exist_ok=True)
            os.chown(d, uid, gid)
        local = self.base / "local"
        local.mkdir(exist_ok=True)
        maps = {
            "mailcow_networks.map": self.local_networks,
            "dovecot_trusted.map": self.sieve_hosts,
            "rspamd_trusted.map": self.rspamd_hosts,
        }
        for name, nets in maps.items():
            (local / name).write_text("".join(f"{n}\n" for n in nets))
        (local / "mailcow.lua").write_text(_LUA)
        (local / "effective_tld_names.dat").write_text("".join(f"{t}\n" for t in TLDS))
        files = {
            "rspamd.conf": self._main_conf(local),
            "modules.conf": _modules_conf(local),
        }
        for name, text in files.items():
            (self.base / name).write_text(text)
        # trap 1: the password file is readable by rspamd's group, nobody else
        host, port, password = self.redis
        path = self.base / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(f'servers = "{host}:{port}";\npassword = "{password}";\ntimeout = 5s;\n')
        os.chown(path, 0, gid)

    def _main_conf(self, local: Path) -> str:
        ns_host, ns_port = self.nameserver
        return f"""\
# Written by tests/harness/rspamd.py: self-contained, nothing from /etc/rspamd.
options {{
    pidfile = "{self.base}/run/rspamd.pid";
    # The C modules: DKIM verification only (DMARC needs its result).
    filters = "dkim";
    # Mailcow: its own Docker networks, nothing else, count as local.
    local_addrs = "{local}/mailcow_networks.map";
    dns {{
        nameserver = ["{ns_host}:{ns_port}"];
        timeout = 1s;
        retransmits = 2;
    }}
    # No Internet here: no periodic checks that DNS lists and resolvers answer.
    disable_monitoring = true;
    # The public suffix list, for organizational domains (DMARC): trap 6.
    url_tld = "{local}/effective_tld_names.dat";
    hs_cache_dir = "{self.base}/db";
    cache_file = "{self.base}/db/symbols.cache";
    control_socket = "{self.base}/run/rspamd.sock mode=0600";
    history_file = "{self.base}/db/rspamd.history";
    stats_file = "{self.base}/db/stats.ucl";
    task_timeout = 10s;
    # Mailcow: a scan that times out is a soft reject, never a silent accept.
    soft_reject_on_timeout = true;
}}

logging {{
    type = "file";
    filename = "{self.log_path}";
    level = "info";
    log_format = "{_LOG_FORMAT}";
}}

# The scanner. Mailcow: one process, on port 11333.
worker "normal" {{
    bind_socket = "127.0.0.1:{self.normal_port}";
    count = 1;
    task_timeout = 10s;
}}

# What Postfix talks to (Mailcow: inet:rspamd:9900): milter in, scans by the worker above.
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{self.milter_port}";
    milter = yes;
    count = 1;
    timeout = 30s;
    upstream "local" {{
        default = yes;
        hosts = "127.0.0.1:{self.normal_port}";
    }}
    reject_message = "{REJECT_MESSAGE}";
}}

redis {{
    .include "{self.base}/redis.conf"
}}

# Mailcow's thresholds (local.d/actions.conf).
actions {{
    reject = 15;
    add_header = 8;
    greylist = 7;
}}

.include "{self.base}/modules.conf"

# Our Lua: the helpers the plugins expect as globals, then Mailcow's own symbols.
lua = "{local}/mailcow.lua";
"""

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Rspamd:
        if self.running:
            return self
        if not self.milter_port:
            self.milter_port = free_port()
            self.normal_port = free_port()
        self.write_config()
        out = open(self.base / "stdout.log", "ab")  # noqa: SIM115 - closed right after Popen
        self.proc = subprocess.Popen(
            [
                RSPAMD,
                "-f",  # foreground: the PID we hold is the main process
                "-u",
                USER,
                "-g",
                USER,
                "-c",
                str(self.conf_path),
                f"--var=CONFDIR={self.base}",
                f"--var=LOCAL_CONFDIR={self.base / 'local'}",
                f"--var=RUNDIR={self.base / 'run'}",
                f"--var=DBDIR={self.base / 'db'}",
                f"--var=LOGDIR={self.base / 'log'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() can reach every worker
        )
        out.close()  # the child has its own copy
        self._finalizer = weakref.finalize(self, _reap, self.proc.pid)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Trap 2: both workers must answer, not just the sockets accept."""
        deadline = time.monotonic() + self.start_timeout
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"rspamd exited with {self.proc.returncode}:\n{self.output_tail()}"
                )
            if self._normal_ready() and self._proxy_ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rspamd not ready after {self.start_timeout}s:\n{self.output_tail()}"
                )
            time.sleep(0.05)

    def _normal_ready(self) -> bool:
        # http.client, not urllib: urlopen would ask an http_proxy from the environment, and
        # rspamd would look "not ready" whenever one is set
        conn = http.client.HTTPConnection("127.0.0.1", self.normal_port, timeout=5)
        try:
            conn.request("GET", "/ping")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):  # not up yet, or a half answer
            return False
        finally:
            conn.close()

    def _proxy_ready(self) -> bool:
        try:
            with MilterClient(self.milter, timeout=1) as c:
                c.negotiate()
            return True
        except Exception:  # any failure means "not yet"
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the main process (it stops its workers), by PID; SIGKILL to our own
        process group if anything is left after ``timeout``. Safe to call repeatedly."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=5)
        deadline = time.monotonic() + timeout
        while group_members(pgid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                break
            time.sleep(0.02)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def cleanup(self) -> None:
        """Stop and remove the directory."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Rspamd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- results -------------------------------------------------------------------------

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output_tail(self, n: int = 40) -> str:
        parts = []
        for path in (self.base / "stdout.log", self.log_path):
            with contextlib.suppress(OSError):
                parts.append("\n".join(path.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(parts)

    def results(self) -> list[RspamdResult]:
        found = []
        for line in self.read_log().splitlines():
            m = _SCAN_RE.search(line)
            if not m:
                continue
            symbols = {name: float(score) for name, score in _SYMBOL_RE.findall(m["symbols"])}
            found.append(
                RspamdResult(
                    message_id=m["mid"],
                    queue_id=m["qid"],
                    ip=m["ip"],
                    user=m["user"],
                    action=m["action"].strip(),
                    score=float(m["score"]),
                    required=float(m["required"]),
                    symbols=symbols,
                )
            )
        return found

    def result_for(self, message_id: str, timeout: float = 60.0) -> RspamdResult:
        """The scan of the message with this Message-ID (without <>), waiting for its line."""
        deadline = time.monotonic() + timeout
        while True:
            for r in self.results():
                if r.message_id == message_id:
                    return r
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no rspamd scan of <{message_id}> after {timeout}s\n{self.output_tail()}"
                )
            time.sleep(0.05)


# SPOOFED_UNAUTH's condition, one clause a line.
SPOOFED_UNAUTH = " & ".join(
    [
        "!MAILCOW_AUTH",  # not SMTP-authenticated
        "!MAILCOW_WHITE",  # not whitelisted in Mailcow's settings
        "!RSPAMD_HOST",  # not Mailcow's rspamd container
        "!SIEVE_HOST",  # not Mailcow's dovecot (sieve) container
        "MAILCOW_DOMAIN_HEADER_FROM",  # From: one of Mailcow's domains
        "!WHITELISTED_FWD_HOST",  # not a forwarding host
        "-g+:policies",  # a policy symbol scored positive (SPF, DKIM, DMARC failing), kept
    ]
)


def _modules_conf(local: Path) -> str:
    return f"""\
# The modules Mailcow's SPOOFED_UNAUTH decision and its DKIM signing depend on, nothing more.
# A Lua plugin runs only when it has a section here. The plugins' code is the package's.
modules {{
    path = "${{PLUGINSDIR}}";
}}

# The policy symbols' scores: Mailcow's where it sets one (local.d/policies_group.conf), the
# others as rspamd ships them. The spf, dkim and dmarc modules put these symbols in the group.
group "policies" {{
    symbols {{
        R_SPF_FAIL {{ score = 8.0; }}
        R_SPF_PERMFAIL {{ score = 8.0; }}
        R_SPF_SOFTFAIL {{ score = 0.1; }}
        R_DKIM_REJECT {{ score = 8.0; }}
        DMARC_POLICY_REJECT {{ score = 16.0; }}
        DMARC_POLICY_QUARANTINE {{ score = 8.0; }}
        DMARC_POLICY_SOFTFAIL {{ score = 0.1; }}
        R_SPF_ALLOW {{ score = -0.2; }}
        R_DKIM_ALLOW {{ score = -0.2; }}
        DMARC_POLICY_ALLOW {{ score = -0.5; }}
        R_SPF_NEUTRAL {{ score = 0.0; }}
        R_SPF_NA {{ score = 0.0; }}
        R_SPF_DNSFAIL {{ score = 0.0; }}
        R_DKIM_NA {{ score = 0.0; }}
        R_DKIM_TEMPFAIL {{ score = 0.0; }}
        R_DKIM_PERMFAIL {{ score = 0.0; }}
        DMARC_NA {{ score = 0.0; }}
    }}
}}
group "mailcow" {{
    symbols {{
        MAILCOW_AUTH {{ score = -20.0; description = "SMTP-authenticated client"; }}
        # Set by Mailcow's per-domain whitelist settings, of which this Mailcow has none.
        MAILCOW_WHITE {{ score = -999.0; }}
    }}
}}

spf {{ }}
dkim {{ }}
dmarc {{ }}

multimap {{
    # Mailcow's Forwarding Hosts (System > Configuration > Options): an address or CIDR per
    # field of the hash.
    WHITELISTED_FWD_HOST {{
        type = "ip";
        map = "redis://WHITELISTED_FWD_HOST";
        symbols_set = ["WHITELISTED_FWD_HOST"];
    }}
    # The From: domain is one of Mailcow's (Redis DOMAIN_MAP, kept by the UI).
    MAILCOW_DOMAIN_HEADER_FROM {{
        type = "header";
        header = "from";
        filter = "email:domain";
        map = "redis://DOMAIN_MAP";
    }}
    # Mailcow's dovecot (sieve forwards and rejects) and rspamd containers.
    SIEVE_HOST {{
        type = "ip";
        map = "{local}/dovecot_trusted.map";
        symbols_set = ["SIEVE_HOST"];
    }}
    RSPAMD_HOST {{
        type = "ip";
        map = "{local}/rspamd_trusted.map";
        symbols_set = ["RSPAMD_HOST"];
    }}
}}

composites {{
    # A client that is neither authenticated nor one of Mailcow's own hosts nor a forwarding
    # host, sending with a From: in a Mailcow domain that fails a sender policy (any symbol of
    # the policies group with a positive score): a spoofed local sender.
    SPOOFED_UNAUTH {{
        expression = "{SPOOFED_UNAUTH}";
        score = 50.0;
    }}
    # Mail from a forwarding host loses its failing policy results, symbols and scores (it
    # relays other people's mail). Mailcow's rule does the same to the RBL, hfilter and neural
    # groups, none of which runs here.
    WL_FWD_HOST {{
        expression = "-WHITELISTED_FWD_HOST & ^g+:policies";
    }}
}}

force_actions {{
    rules {{
        # Mail from a forwarding host is never rejected, at worst tagged,
        FWD_HOST_NEVER_REJECT {{
            action = "add header";
            expression = "WHITELISTED_FWD_HOST";
            require_action = ["reject"];
        }}
        # and never delayed.
        FWD_HOST_NEVER_DELAY {{
            action = "no action";
            expression = "WHITELISTED_FWD_HOST";
            require_action = ["greylist", "soft reject"];
        }}
    }}
}}

dkim_signing {{
    # Sign for SMTP-authenticated users and Mailcow's own networks (and dovecot, below) only.
    sign_authenticated = true;
    sign_local = true;
    # Mailcow's dovecot (sieve) signs with the From domain, everything else with MAIL FROM's.
    sign_networks = "{local}/dovecot_trusted.map";
    use_domain = "envelope";
    use_domain_sign_networks = "header";
    allow_hdrfrom_mismatch = true;
    allow_hdrfrom_multiple = true;
    allow_username_mismatch = true;
    allow_envfrom_empty = true;
    use_esld = false;
    try_fallback = true;
    selector = "dkim";
    # The keys the Mailcow UI manages, in Redis.
    use_redis = true;
    key_prefix = "DKIM_PRIV_KEYS";
    selector_prefix = "DKIM_SELECTORS";
    symbol = "DKIM_SIGNED";
}}

milter_headers {{
    use = ["x-spamd-result", "authentication-results"];
    skip_local = false;
    skip_authenticated = true;
}}
"""


# Mailcow's own symbols, in our words (Mailcow: data/conf/rspamd/lua/rspamd.local.lua).
_LUA = r"""
-- The globals the stock rules file would set up (rspamd_parse_redis_server and friends).
require "global_functions" ()

local rspamd_logger = require "rspamd_logger"

-- The client authenticated with SMTP AUTH (the milter's {auth_authen}).
rspamd_config.MAILCOW_AUTH = {
  callback = function(task)
    if task:get_user() then
      return true
    end
    return false
  end,
}

-- Never set here: Mailcow's per-domain whitelists set it through settings.
rspamd_config:register_symbol({
  name = 'MAILCOW_WHITE',
  type = 'normal',
  callback = function(task) return false end,
})

-- A forwarding host with "spam filter" off (Redis KEEP_SPAM[address or prefix] = 1):
-- accepted before any rule runs. Authenticated clients are not looked up.
local keep_spam_redis = rspamd_parse_redis_server('keep_spam')

rspamd_config:register_symbol({
  name = 'KEEP_SPAM',
  type = 'prefilter',
  priority = 19,
  callback = function(task)
    if task:get_user() then
      return
    end
    local ip = task:get_from_ip()
    if not ip or not ip:is_valid() then
      return
    end
    -- the address itself, then every prefix that contains it, as the UI may store either
    local fields = {'KEEP_SPAM', ip:to_string()}
    local top, bottom = 32, 8
    if ip:get_version() == 6 then
      top, bottom = 128, 32
    end
    for bits = top, bottom, -1 do
      table.insert(fields, ip:apply_mask(bits):to_string() .. '/' .. bits)
    end
    local function answer(err, data)
      if err or type(data) ~= 'table' then
        rspamd_logger.infox(task, 'KEEP_SPAM lookup for %s failed: %s', ip, err)
        return
      end
      for _, v in pairs(data) do
        if v == '1' then
          task:set_pre_result('accept', 'forwarding host with spam filter off', 'keep_spam')
          task:set_flag('no_stat')
          return
        end
      end
    end
    rspamd_redis_make_request(task, keep_spam_redis, 'KEEP_SPAM', false, answer,
      'HMGET', fields)
  end,
})
"""
