"""Who may talk to the milter: the MTAs in `mta_peers`, by the connection's own peer address.

Whoever can speak the milter protocol to us can ask for a signature over any content: the
client address in a milter connect packet is whatever the peer writes, so only the TCP peer
address of the connection says who is talking. On a Docker network shared with a dozen other
containers (Mailcow's), that must be the MTA's container and nothing else.

`mta_peers` holds addresses, networks and host names. Names (a Postfix container's, which gets
a new address when it is re-created) are resolved after each key refresh (the first right after
the milter listens), at SIGHUP, and once, at most every RETRY_SECONDS, when an unknown peer
connects (milter/server.py holds that connection meanwhile); a name that does not resolve keeps its
last good addresses. Unix sockets are governed by their file mode instead.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from ipaddress import ip_address, ip_network

from .config import Config, IPNetwork
from .logs import event
from .milter.address import ListenKind
from .relay import RelayTable

__all__ = ["RETRY_SECONDS", "MtaGate", "MtaPeers", "resolve_host", "unguarded_listen_warning"]

# An unknown peer makes us resolve the names again at most this often: a container that keeps
# connecting cannot turn us into a DNS load generator.
RETRY_SECONDS = 10.0

Resolver = Callable[[str], Iterable[str]]
_GENERATIONS = itertools.count(1)


def resolve_host(name: str) -> frozenset[str]:
    """The IPv4 and IPv6 addresses of a host name, through the system resolver (Docker's DNS
    in a container, /etc/hosts). OSError when it has none."""
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return frozenset(str(info[4][0]).partition("%")[0] for info in infos)


def _host_network(address: str) -> IPNetwork:
    return ip_network(ip_address(address))


class MtaPeers:
    """The peers allowed to connect. `allows()` runs on the event loop at each accept and
    reads one immutable table; `resolve()` (a worker thread) builds a new one and swaps it."""

    def __init__(
        self,
        entries: Iterable[IPNetwork | str] | None,
        *,
        resolver: Resolver = resolve_host,
        clock: Callable[[], float] = time.monotonic,
        previous: MtaPeers | None = None,
    ) -> None:
        self.configured = entries is not None
        items = list(entries or ())
        self._networks = tuple(e for e in items if not isinstance(e, str))
        self.names = tuple(e for e in items if isinstance(e, str))
        self._resolver = resolver
        self._clock = clock
        self._lock = threading.Lock()
        # last good addresses per name; a name kept across a reload keeps them
        old = previous._addresses if previous is not None else {}
        self._addresses: dict[str, frozenset[str]] = {n: old[n] for n in self.names if n in old}
        self._failing: set[str] = set()  # names whose failure was logged (once per episode)
        self._last_retry = -math.inf  # the last resolution an unknown peer asked for
        self._table = self._build()
        # new whenever allows() may answer differently: a new table, or a new MtaPeers (a
        # reload); the server then checks its open connections again
        self.generation = next(_GENERATIONS)

    def _build(self) -> RelayTable:
        hosts = [_host_network(a) for addrs in self._addresses.values() for a in addrs]
        return RelayTable.of((*self._networks, *hosts))

    def allows(self, ip: str) -> bool:
        """May a connection from this peer address speak to the milter? Everyone when
        mta_peers is unset; an IPv4-mapped IPv6 peer (a dual-stack socket) is matched as IPv4."""
        return not self.configured or self._table.contains(ip)

    def may_retry(self) -> bool:
        """May an unknown peer have the names resolved again (there are names, and no unknown
        peer asked within RETRY_SECONDS; the periodic resolutions do not count)?"""
        return bool(self.names) and self._clock() - self._last_retry >= RETRY_SECONDS

    def retry(self) -> None:
        """resolve(), asked for by an unknown peer (see may_retry)."""
        self._last_retry = self._clock()
        self.resolve()

    def resolve(self) -> None:
        """Resolve every name again; a name that fails keeps its last good addresses (and
        is logged once until it resolves again). Never raises."""
        with self._lock:
            for name in self.names:
                try:
                    found = frozenset(self._resolver(name))
                    if not found:
                        raise OSError("no address")
                except (OSError, UnicodeError) as exc:
                    if name not in self._failing:
                        self._failing.add(name)
                        kept = sorted(self._addresses.get(name, ()))
                        event(
                            logging.WARNING,
                            "an mta_peers name does not resolve; keeping its last addresses",
                            name=name,
                            error=getattr(exc, "strerror", None) or str(exc),
                            kept=",".join(kept) or "none",
                        )
                    continue
                if name in self._failing or found != self._addresses.get(name):
                    event(
                        logging.INFO,
                        "mta_peers name resolved",
                        name=name,
                        addresses=",".join(sorted(found)),
                    )
                self._failing.discard(name)
                self._addresses[name] = found
            table = self._build()
            if table != self._table:
                self._table = table
                self.generation = next(_GENERATIONS)

    def describe(self) -> str:
        """What is allowed now, for logs and check-config."""
        parts = [str(n) for n in self._networks]
        for name in self.names:
            addrs = self._addresses.get(name)
            parts.append(f"{name} ({', '.join(sorted(addrs)) if addrs else 'unresolved'})")
        return ", ".join(parts)


def unguarded_listen_warning(config: Config) -> str | None:
    """A warning when any host that reaches the milter's port may ask for signatures: an inet
    listener on a non-loopback address with no mta_peers."""
    listen = config.listen
    if config.mta_peers is not None or listen.kind is ListenKind.UNIX:
        return None
    host = listen.host or ""
    try:
        loopback = ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"the milter listens on {listen} and mta_peers is not set: any host that can reach "
        "that port can ask for signatures of every domain; set mta_peers to your MTA "
        "(e.g. [postfix-mailcow])"
    )


REFUSAL_LOG_SECONDS = 60.0  # a refused peer is logged at most this often
_MAX_REFUSALS_LOGGED = 256  # distinct peers whose refusal is logged per minute


class MtaGate:
    """mta_peers as the milter server's peer gate (milter.api.PeerGate): the current MtaPeers
    (a reload replaces it), and each refusal counted and logged, at most once a minute per
    peer (and, with a flood of peers, at most 256 a minute in all)."""

    def __init__(self, peers: Callable[[], MtaPeers], count: Callable[[], None]) -> None:
        self._peers = peers
        self._count = count
        self._logged: OrderedDict[str, float] = OrderedDict()  # peer -> when, oldest first

    @property
    def generation(self) -> int:
        return self._peers().generation

    def allows(self, ip: str) -> bool:
        return self._peers().allows(ip)

    def may_retry(self) -> bool:
        return self._peers().may_retry()

    def retry(self) -> None:
        self._peers().retry()

    def refused(self, ip: str) -> None:
        self._count()
        now = time.monotonic()
        logged = self._logged
        while logged and now - next(iter(logged.values())) >= REFUSAL_LOG_SECONDS:
            logged.popitem(last=False)  # oldest first: forget what was logged a minute ago
        if ip not in logged and len(logged) < _MAX_REFUSALS_LOGGED:
            logged[ip] = now
            event(
                logging.WARNING,
                "milter connection refused: the peer is not in mta_peers",
                peer=ip,
                allowed=self._peers().describe(),
            )
