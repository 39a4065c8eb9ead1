"""A throwaway, real Postfix instance for tests (runs as root, loopback only).

Everything lives under one temp directory::

    BASE/            0755 (mkdtemp makes 0700; see trap 1)
      etc/           config_directory: main.cf, master.cf
      spool/         queue_directory (root-owned; sub dirs as in postfix-files)
      data/          data_directory, owned by the ``postfix`` user
      maillog        maillog_file, written by the ``postlog`` service

smtpd listens on ``127.0.0.1:PORT`` (and ``[::1]:PORT`` when the host has IPv6 loopback);
everything is relayed to ``relayhost = [127.0.0.1]:SINKPORT``.

Traps found while building this (Postfix 3.7.11, Debian bookworm):

1. Every parent directory of queue_directory must be searchable by the ``postfix`` user
   (the daemons chdir() there after dropping privileges). ``tempfile.mkdtemp()`` and
   pytest's ``tmp_path`` (/tmp/pytest-of-root/, mode 0700) are not, so the base directory
   is made here with mode 0755 directly under the system temp dir.
2. data_directory must exist and be owned by ``mail_owner``, else the master dies on its
   lock file. The queue sub-directories need their postfix-files owners/modes (trap 9).
3. Debian's master.cf runs most services chroot'ed (column 5 = ``y``); the chroot would
   be the temp spool, which has no /etc/services, resolv.conf, etc. The harness writes its
   own master.cf (never the host's): no chroot, the ``postlog unix-dgram`` service
   (``postfix start`` refuses to run with ``maillog_file`` set and no ``postlog``), and
   explicit ``127.0.0.1:PORT`` smtpd listeners instead of ``smtp inet``.
4. ``maillog_file`` must sit under one of ``maillog_file_prefixes`` (default ``/var,
   /dev/stdout``), so the prefix list is set to the temp dir.
5. Without ``compatibility_level`` Postfix runs in "level 0" backwards-compatibility mode
   (smtputf8 off, append_dot_mydomain on, compat warnings in the log). 3.6+ wants
   ``3.6``; older versions only know the integers ``0..2``, so the value is chosen from
   ``mail_version``.
6. cleanup edits headers of clients in ``local_header_rewrite_clients`` (default
   ``permit_inet_interfaces``) *before* the milters see the message: it appends
   ``@$myhostname`` to unqualified header addresses (``From: bob``) and adds a missing
   ``Date:`` / ``Message-ID:``. Our test client on 127.0.0.1 qualifies, and so does an
   XCLIENT ADDR=192.0.2.9 session: ``permit_inet_interfaces`` looks at the real socket
   peer, not at the XCLIENT address (other rules, e.g. ``permit_mynetworks`` or
   ``check_address_map``, do use the XCLIENT address). Kept at the Postfix default for
   realism; ``extra_main_cf={"local_header_rewrite_clients": ""}`` turns it off.
   Postfix always prepends its own ``Received:`` field; the body is never touched.
7. The smtp client folds body lines longer than ``smtp_line_length_limit`` (998) *after*
   the milters ran; keep test lines shorter unless that is what you are testing.
8. ``postfix stop`` (postfix-script) kills the master and then polls with ``sleep 1``, so it
   always costs at least one second. ``stop()`` does the same thing without the sleep:
   SIGTERM to the master PID from ``pid/master.pid`` (the master then TERMs its process
   group), poll every 20 ms, SIGKILL the process group after 5 s.
9. ``postfix start`` runs ``postfix-script check-fatal`` (``post-install
   create-missing`` + ``postsuper``) and ``check-warn`` (walks the shared daemon, meta
   and shlib directories): 0.35-1 s of shell. ``start()`` instead creates the queue and
   data directories itself, as listed in the installed ``$meta_directory/postfix-files``
   (falling back to ``postfix post-install create-missing``), and then starts with the
   ``quick-start`` flag file that postfix-script honours: ~50 ms.
10. XCLIENT: after ``XCLIENT ADDR=192.0.2.9`` the client is no longer in ``mynetworks``,
    so relaying is refused unless the test adds that address (``extra_mynetworks``).
    XCLIENT values are xtext; an IPv6 ADDR must be written ``IPV6:2001:db8::1``. Postfix
    answers XCLIENT with a new 220 greeting; the client must EHLO again.
11. ``smtpd_error_sleep_time`` (1 s) would slow down every test that provokes a reject;
    it is 0 here, and the error limits are high.
12. smtplib does not touch line ends of a ``bytes`` message (it only dot-stuffs and adds
    a final CRLF if missing): pass CRLF messages.
13. smtpd compares the client's SIZE= with free queue space x 1.5; the default
    ``message_size_limit`` here is 200 MB so 60 MB test messages fit.
14. ``reload`` is asynchronous (SIGHUP); ``reload()`` waits for the master's
    "reload -- version" log line so new connections see the new main.cf.
15. Every Postfix program sleeps in 300 ms steps until main.cf's mtime is ~2 s in the past
    (dict_load_file: "pausing to let main.cf cool down"). A freshly written main.cf made
    ``postfix start`` take 2.1 s; the files' mtimes are therefore set 10 s back.
16. A broken smtpd setting (e.g. a malformed ``smtpd_milters`` brace list) does not stop
    ``postfix start``: smtpd dies with "fatal:" per connection and the master throttles.
    ``send()`` then reports stage "connect"/"disconnect"; look at ``log_tail()``.
    ``start()`` does no SMTP probe (it would be an extra connect event at the milter);
    ``master -w`` already waits until the listeners are open. ``start()`` never leaves a
    master behind when it raises, and an atexit hook stops instances a test forgot.
17. This VM's PID 1 reaps orphans lazily: after ``stop()`` the master (reparented to PID
    1 when it daemonized) shows as ``[master] <defunct>`` in ``ps`` for up to ~2 s. It is
    dead; ``procfs.group_members`` ignores zombies.
18. ``master.pid`` can outlive its master; before signalling, ``master_pid()`` checks that
    the PID's cwd is this instance's queue directory, so a reused PID is never killed.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from .ports import free_port
from .procfs import group_members

if TYPE_CHECKING:
    from .sink import SmtpSink

__all__ = [
    "POSTFIX",
    "PostfixError",
    "PostfixInstance",
    "SendResult",
    "free_port",
    "has_ipv6_loopback",
    "postfix_available",
    "postfix_version",
    "postmap_query",
]

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
# The services Postfix needs to relay, none chroot'ed (trap 3); the smtpd listeners are added
# per instance. Written here rather than copied from /etc/postfix/master.cf: a test reads no host
# configuration it did not create.
_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred")


class PostfixError(RuntimeError):
    """Postfix could not be started/stopped/reloaded; the message includes the log tail."""


@dataclass
class SendResult:
    """Outcome of one SMTP transaction.

    ``stage`` is the step that produced ``code``/``message``: "connect", "ehlo",
    "xclient", "mail", "rcpt" (every recipient refused), "data" (DATA command refused)
    or "dot" (the reply after the message content: 250 = queued).
    """

    code: int
    message: bytes
    stage: str
    rcpt_replies: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.stage == "dot" and 200 <= self.code < 300

    @property
    def queue_id(self) -> str | None:
        m = re.search(rb"queued as ([0-9A-Za-z]+)", self.message)
        return m.group(1).decode() if m else None


# Instances started and not yet stopped: stopped at interpreter exit as a last resort
# (a test that dies between start() and its cleanup must not leave a master behind).
_RUNNING: set[PostfixInstance] = set()


@atexit.register
def _stop_leftovers() -> None:
    for inst in list(_RUNNING):
        with contextlib.suppress(Exception):
            inst.cleanup()


# -- module helpers -------------------------------------------------------------------


def postfix_available() -> bool:
    return os.path.isfile(POSTFIX) and os.access(POSTFIX, os.X_OK)


@cache
def postfix_version() -> tuple[int, ...]:
    out = subprocess.run(
        [POSTCONF, "-dh", "mail_version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    return tuple(int(p) for p in re.findall(r"\d+", out)[:3])


@cache
def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@cache
def _postfix_files_dirs() -> list[tuple[str, str, str, int]]:
    """(path, owner, group, mode) of the queue/data directories in postfix-files."""
    try:
        meta = subprocess.run(
            [POSTCONF, "-dh", "meta_directory"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        lines = (Path(meta) / "postfix-files").read_text().splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    specs = []
    for line in lines:
        parts = line.split(":")
        if (
            len(parts) >= 5
            and parts[1] == "d"
            and parts[0].split("/")[0]
            in (
                "$queue_directory",
                "$data_directory",
            )
        ):
            specs.append((parts[0], parts[2], parts[3], int(parts[4], 8)))
    return specs


def _xtext(value: str) -> str:
    """RFC 3461 xtext, as XCLIENT wants: '+', '=' and non-printables become +HH."""
    out = []
    for b in value.encode("utf-8"):
        if 33 <= b <= 126 and b not in (ord("+"), ord("=")):
            out.append(chr(b))
        else:
            out.append(f"+{b:02X}")
    return "".join(out)


def _format_main_cf(params: Mapping[str, str]) -> str:
    lines = []
    for key, value in params.items():
        if "\n" in value:
            raise ValueError(f"main.cf value for {key} contains a newline")
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def _compatibility_level() -> str:
    """Trap 5: the level that turns off Postfix's backwards-compatibility mode and warnings."""
    return "3.6" if postfix_version() >= (3, 6) else "2"


def postmap_query(table: str, key: str, config_dir: Path) -> str | None:
    """``postmap -q KEY TABLE`` with a config directory of the test's own: the value, or None
    when the table has no entry for KEY.

    Every Postfix tool reads ``main.cf``; without ``-c`` that is the host's
    /etc/postfix/main.cf, which a machine with Postfix installed as "No configuration" does
    not have. postmap exits 1 both for "not found" and for a fatal error, so only an exit 1
    with nothing on stderr means "not found"; anything else raises.
    """
    config_dir.mkdir(parents=True, exist_ok=True)
    main_cf = config_dir / "main.cf"
    if not main_cf.exists():
        main_cf.write_text(_format_main_cf({"compatibility_level": _compatibility_level()}))
        past = time.time() - 10  # trap 15
        os.utime(main_cf, (past, past))
    p = subprocess.run(
        ["/usr/sbin/postmap", "-c", str(config_dir), "-q", key, table],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    if p.returncode == 0 and not p.stderr:
        return p.stdout.strip()
    if p.returncode == 1 and not p.stdout and not p.stderr:
        return None
    raise PostfixError(f"postmap -q {key} {table} exited {p.returncode}: {p.stderr.strip()}")


# -- the instance ----------------------------------------------------------------------


class PostfixInstance:
    """One private Postfix. ``start()`` writes the config and starts the master.

    ``milters`` becomes ``smtpd_milters``; ``extra_main_cf`` overrides/extends main.cf
    (applied last, so it can override any default below); ``extra_mynetworks`` is added to
    ``127.0.0.0/8 [::1]/128``.
    """

    def __init__(
        self,
        sink_port: int,
        milters: str = "",
        *,
        milter_default_action: str = "accept",
        extra_main_cf: Mapping[str, str] | None = None,
        extra_mynetworks: Iterable[str] = (),
        ipv6: bool | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.sink_port = sink_port
        self.milters = milters
        self.milter_default_action = milter_default_action
        self.extra_main_cf = dict(extra_main_cf or {})
        self.extra_mynetworks = list(extra_mynetworks)
        self.ipv6 = has_ipv6_loopback() if ipv6 is None else ipv6
        self.host = "127.0.0.1"
        self.host6 = "::1" if self.ipv6 else None
        self.port = 0
        self._own_base = base_dir is None
        if base_dir is None:
            base = Path(tempfile.mkdtemp(prefix="pfx-harness-", dir=tempfile.gettempdir()))
        else:
            base = Path(base_dir)
            base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)  # trap 1
        self.base = base
        self.config_dir = base / "etc"
        self.queue_dir = base / "spool"
        self.data_dir = base / "data"
        self.log_path = base / "maillog"
        self.sink: SmtpSink | None = None  # set by the postfix_factory fixture
        self.running = False
        self.start_seconds = 0.0
        self.stop_seconds = 0.0
        self._started_once = False

    # -- configuration ---------------------------------------------------------------

    def main_cf_params(self) -> dict[str, str]:
        compat = _compatibility_level()
        mynetworks = ["127.0.0.0/8", "[::1]/128", *self.extra_mynetworks]
        interfaces = "127.0.0.1, [::1]" if self.ipv6 else "127.0.0.1"
        params: dict[str, str] = {
            "compatibility_level": compat,
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.base),
            "syslog_name": "postfix-harness",
            "myhostname": "mta.harness.test",
            "mydomain": "harness.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "local_transport": "error:local delivery disabled in harness",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "inet_interfaces": interfaces,
            "inet_protocols": "all" if self.ipv6 else "ipv4",
            "mynetworks": " ".join(mynetworks),
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8, [::1]/128",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtputf8_enable": "yes",
            "disable_mime_output_conversion": "yes",
            "message_size_limit": str(200 * 1024 * 1024),
            "mailbox_size_limit": "0",
            "milter_protocol": "6",
            "smtpd_milters": self.milters,
            "non_smtpd_milters": "",
            "milter_default_action": self.milter_default_action,
            "in_flow_delay": "0",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connection_cache_on_demand": "no",
            "smtp_connect_timeout": "5s",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "200",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_banner": "$myhostname ESMTP harness",
        }
        params.update(self.extra_main_cf)
        return params

    def _listeners(self) -> list[str]:
        lines = [f"127.0.0.1:{self.port} inet n - n - - smtpd"]
        if self.ipv6:
            lines.append(f"[::1]:{self.port} inet n - n - - smtpd")
        return lines

    def write_config(self) -> None:
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)  # trap 2
        (self.config_dir / "master.cf").write_text(_MASTER_CF + "\n".join(self._listeners()) + "\n")
        self._write_main_cf()

    def _write_main_cf(self) -> None:
        main_cf = self.config_dir / "main.cf"
        main_cf.write_text(_format_main_cf(self.main_cf_params()))
        # Trap: Postfix's dict_load_file() sleeps in 300 ms steps until a config file's
        # mtime is at least ~2 s in the past ("pausing to let main.cf cool down").
        past = time.time() - 10
        for path in (main_cf, self.config_dir / "master.cf"):
            os.utime(path, (past, past))

    def set_main_cf(self, params: Mapping[str, str], reload: bool = True) -> None:
        """Change main.cf parameters (kept across restarts); reload if running."""
        self.extra_main_cf.update(params)
        if "smtpd_milters" in params:
            self.milters = params["smtpd_milters"]
        self._write_main_cf()
        if reload and self.running:
            self.reload()

    # -- lifecycle -------------------------------------------------------------------

    def _postfix(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 60) -> PostfixInstance:
        if self.running:
            return self
        t0 = time.monotonic()
        last_error = ""
        for _attempt in range(3):
            if not self.port:
                self.port = free_port(ipv6_too=self.ipv6)
            self.write_config()
            if not self._started_once:
                self._create_dirs(timeout)
            (self.queue_dir / "quick-start").touch()  # trap 9
            mark = self.log_mark()
            try:
                proc = self._postfix("start", timeout=timeout)
            except subprocess.TimeoutExpired as e:
                self._kill_master()
                raise PostfixError(f"postfix start hung for {timeout}s\n{self.log_tail()}") from e
            if proc.returncode == 0:
                self.running = True
                self._started_once = True
                break
            last_error = f"{proc.stdout}{proc.stderr}{self.read_log(since=mark)}"
            self._kill_master()
            if "Address already in use" not in last_error:
                break
            self.port = 0  # someone took our port: pick another one
        if not self.running:
            raise PostfixError(f"postfix start failed:\n{last_error}")
        # "postfix start" runs "master -w", which returns only once the master has opened
        # its listeners, so the port accepts connections now. Deliberately no SMTP probe:
        # it would show up as an extra connect event at the milter under test.
        self.start_seconds = time.monotonic() - t0
        _RUNNING.add(self)
        return self

    def _create_dirs(self, timeout: float) -> None:
        """Create the queue/data directories listed in the installed postfix-files (what
        ``post-install create-missing`` does, in ~1 ms instead of ~300 ms of shell)."""
        specs = _postfix_files_dirs()
        if not specs:
            proc = self._postfix("post-install", "create-missing", timeout=timeout)
            if proc.returncode != 0:
                raise PostfixError(f"post-install failed:\n{proc.stdout}{proc.stderr}")
            return
        roots = {"$queue_directory": self.queue_dir, "$data_directory": self.data_dir}
        users = {"$mail_owner": "postfix", "$setgid_group": "postdrop"}
        for path, owner, group, mode in specs:
            root, _, rest = path.partition("/")
            target = roots[root] / rest if rest else roots[root]
            target.mkdir(parents=True, exist_ok=True)
            uid = pwd.getpwnam(users.get(owner, owner)).pw_uid
            gid = (
                grp.getgrnam(users.get(group, group)).gr_gid
                if group != "-"
                else pwd.getpwnam(users.get(owner, owner)).pw_gid
            )
            os.chown(target, uid, gid)
            os.chmod(target, mode)

    def master_pid(self) -> int | None:
        """PID of *this* instance's running master, or None.

        The pid file can be stale (the PID reused by something else), so the process must
        also have this instance's queue directory as its cwd, as a Postfix master does.
        """
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
        return pid if Path(cwd) == self.queue_dir.resolve() else None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie still answers kill(0); treat it as dead.
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def _kill_master(self, grace: float = 5.0) -> None:
        pid = self.master_pid()
        if pid is None or not self._alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not self._alive(pid):
                break
            time.sleep(0.02)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        # The master TERMs its process group on exit; make sure no child lingers.
        deadline = time.monotonic() + grace
        while group_members(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                break
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the master (trap 8). Safe to call repeatedly and when never started."""
        t0 = time.monotonic()
        self._kill_master()
        self.running = False
        _RUNNING.discard(self)
        self.stop_seconds = time.monotonic() - t0

    def reload(self, timeout: float = 60, idle_exit: float = 2.0) -> None:
        """`postfix reload`, and wait until it has taken effect for SMTP: the master has
        re-read main.cf, and the smtpd processes from before have left. An idle smtpd (one the
        start-up probe spawned, say) leaves within milliseconds of noticing the reload, but a
        connection it accepts before then is served with the old settings: a race a test
        would lose now and then. One still running after `idle_exit` seconds is in a session
        (it leaves when that ends) and serves no new connection: no need to wait for it."""
        old = self._smtpd_pids()
        mark = self.log_mark()
        proc = self._postfix("reload", timeout=timeout)
        if proc.returncode != 0:
            raise PostfixError(f"postfix reload failed:\n{proc.stdout}{proc.stderr}")
        self.wait_for_log(r"reload -- version", timeout=timeout, since=mark)
        deadline = time.monotonic() + idle_exit
        while old & self._smtpd_pids() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _smtpd_pids(self) -> set[int]:
        """The smtpd processes of this instance's master (its children named smtpd)."""
        master = self.master_pid()
        if master is None:
            return set()
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == master and name == "smtpd":
                found.add(int(entry))
        return found

    def cleanup(self) -> None:
        """Stop and remove the temp directory."""
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- SMTP ------------------------------------------------------------------------

    def send(
        self,
        mail_from: str,
        rcpt_tos: str | Iterable[str],
        message_bytes: bytes,
        xclient: Mapping[str, str] | None = None,
        host: str | None = None,
        *,
        helo: str = "client.harness.test",
        mail_options: Iterable[str] = (),
        timeout: float = 60,
    ) -> SendResult:
        """One SMTP transaction to this instance; never raises on SMTP-level refusals.

        ``host`` picks the listener ("127.0.0.1" default, or "::1"). ``xclient`` is sent as
        ``XCLIENT K=V ...`` (values xtext-encoded) after the first EHLO, then EHLO again.
        BODY=8BITMIME is added when the message has 8-bit bytes, SMTPUTF8 when an address
        is non-ASCII, SIZE= when advertised.
        """
        rcpts = [rcpt_tos] if isinstance(rcpt_tos, str) else list(rcpt_tos)
        target = host or self.host
        try:
            smtp = smtplib.SMTP(local_hostname=helo, timeout=timeout)
            code, msg = smtp.connect(target, self.port)
        except smtplib.SMTPServerDisconnected as e:
            return SendResult(421, f"disconnected: {e}".encode(), "connect")
        except OSError as e:  # refused, timed out: the instance is not there
            return SendResult(0, f"{type(e).__name__}: {e}".encode(), "connect")
        if code != 220:
            smtp.close()
            return SendResult(code, msg, "connect")
        try:
            return self._transaction(smtp, mail_from, rcpts, message_bytes, xclient, mail_options)
        except smtplib.SMTPServerDisconnected as e:
            return SendResult(421, f"disconnected: {e}".encode(), "disconnect")
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
            smtp.close()

    @staticmethod
    def _transaction(
        smtp: smtplib.SMTP,
        mail_from: str,
        rcpts: list[str],
        message: bytes,
        xclient: Mapping[str, str] | None,
        mail_options: Iterable[str],
    ) -> SendResult:
        code, msg = smtp.ehlo()
        if code != 250:
            return SendResult(code, msg, "ehlo")
        if xclient:
            args = " ".join(f"{k.upper()}={_xtext(v)}" for k, v in xclient.items())
            code, msg = smtp.docmd("XCLIENT", args)
            if code != 220:
                return SendResult(code, msg, "xclient")
            code, msg = smtp.ehlo()
            if code != 250:
                return SendResult(code, msg, "ehlo")
        options = list(mail_options)
        upper = {o.upper().split("=")[0] for o in options}
        if "BODY" not in upper and any(b > 127 for b in message):
            options.append("BODY=8BITMIME")
        if "SMTPUTF8" not in upper and not all(a.isascii() for a in [mail_from, *rcpts]):
            options.append("SMTPUTF8")
        if "SIZE" not in upper and smtp.has_extn("size"):
            options.append(f"SIZE={len(message)}")
        code, msg = smtp.mail(mail_from, options)
        if code != 250:
            return SendResult(code, msg, "mail")
        replies: dict[str, tuple[int, bytes]] = {}
        for rcpt in rcpts:
            replies[rcpt] = smtp.rcpt(rcpt)
        if not any(c in (250, 251) for c, _ in replies.values()):
            code, msg = list(replies.values())[-1]
            return SendResult(code, msg, "rcpt", replies)
        try:
            code, msg = smtp.data(message)
        except smtplib.SMTPDataError as e:
            err = e.smtp_error
            return SendResult(
                e.smtp_code, err if isinstance(err, bytes) else err.encode(), "data", replies
            )
        return SendResult(code, msg, "dot", replies)

    # -- queue -----------------------------------------------------------------------

    def queue_files(self, include_hold: bool = False) -> list[Path]:
        dirs = [*_QUEUE_SUBDIRS, "hold"] if include_hold else list(_QUEUE_SUBDIRS)
        found: list[Path] = []
        for d in dirs:
            root = self.queue_dir / d
            for dirpath, _dirnames, filenames in os.walk(root):
                found.extend(Path(dirpath) / f for f in filenames)
        return found

    def wait_queue_empty(self, timeout: float = 60.0, include_hold: bool = False) -> None:
        """Wait until incoming/active/deferred/maildrop (and hold, if asked) are empty.

        Raises ``TimeoutError`` listing what is left, with the log tail.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = self.queue_files(include_hold)
            if not left:
                return
            if time.monotonic() > deadline:
                names = ", ".join(str(p.relative_to(self.queue_dir)) for p in left[:20])
                raise TimeoutError(
                    f"queue not empty after {timeout}s: {names}\n--- log tail ---\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    # -- log -------------------------------------------------------------------------

    def log_mark(self) -> int:
        """Current size of the mail log; pass to ``read_log(since=...)``."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_log(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, since: int = 0) -> list[str]:
        return self.read_log(since).splitlines()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_lines()[-n:])

    def wait_for_log(self, pattern: str, timeout: float = 60.0, since: int = 0) -> re.Match[str]:
        """Wait until a log line (after byte offset ``since``) matches the regex."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines(since):
                m = rx.search(line)
                if m:
                    return m
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no log line matching {pattern!r} after {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.02)
