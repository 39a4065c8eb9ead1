"""The running state: one immutable snapshot (config + keys + signing policy), swapped whole.

Every message reads `Controller.current` once, at MAIL, and keeps that snapshot to its end. A
reload (SIGHUP) or a key refresh builds a complete new snapshot and replaces the one reference;
when building fails, the old snapshot keeps serving and the failure is logged and counted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import config as cfg
from .dkim.signer import SigningPolicy
from .keysources.files import PasswordError
from .keysources.forwarding import forwarding_host_warning, outside_forwarding_hosts
from .keysources.local import (
    DirectoryKeySource,
    KeySet,
    KeySource,
    SourceResult,
    SourceUnavailable,
    TableKeySource,
)
from .keysources.specs import DirectorySource, RedisSource, TableSource
from .logs import event
from .metrics import Metrics
from .peers import MtaPeers, unguarded_listen_warning
from .relay import RelayTable

log = logging.getLogger("dkim_sidecar")


def policy_of(config: cfg.Config) -> SigningPolicy:
    return SigningPolicy(
        canonicalization=config.canonicalization,
        sign_headers=config.sign_headers,
        oversign_headers=frozenset(config.oversign_headers),
        expire_after=config.expire_after,
    )


@dataclass(frozen=True)
class Runtime:
    """What one message needs, fixed for its whole life."""

    config: cfg.Config
    keys: KeySet
    policy: SigningPolicy
    # the config's relay networks and those a key source found (Mailcow forwarding hosts)
    _relay: RelayTable = field(default=RelayTable((), ()), repr=False)

    @classmethod
    def build(cls, config: cfg.Config, keys: KeySet) -> Runtime:
        relay = RelayTable.of((*config.relay_networks, *keys.networks))
        return cls(config, keys, policy_of(config), relay)

    def is_relay(self, ip: str) -> bool:
        """Is the client (by the address the MTA reports, never by a header) ours to sign for?"""
        return self._relay.contains(ip)


def make_source(spec: cfg.KeySource, config: cfg.Config, env: Mapping[str, str]) -> KeySource:
    """The key source for one `keys:` entry of the config."""
    if isinstance(spec, cfg.DirectorySource):
        return DirectoryKeySource(spec.path)
    if isinstance(spec, cfg.TableSource):
        return TableKeySource(spec.entries)
    from .keysources.mailcow import RedisKeySource  # redis is only imported when configured

    try:
        password = spec.resolve_password(env)
    except PasswordError as exc:
        raise SourceUnavailable(str(exc)) from None
    networks = config.relay_networks_from_mailcow
    return RedisKeySource(spec, password, None if networks is None else networks.value)


class _Slot:
    """One configured source and its last good result."""

    def __init__(self, spec: cfg.KeySource, source: KeySource | None, error: str | None) -> None:
        self.spec = spec
        self.source = source
        self.error = error  # why the source could not even be built (e.g. password file)
        self.last: SourceResult | None = None
        self.up = False
        self.warned = False  # the "unreachable" line is logged once per outage, not per retry

    @property
    def name(self) -> str:
        """The metric label: from the spec, so that a source that could not be built (an
        unreadable password file at SIGHUP) still counts the last keys it keeps signing with."""
        return self.spec.KIND


# every kind of key source, in the order the metric lists them
SOURCE_KINDS = tuple(spec.KIND for spec in (DirectorySource, TableSource, RedisSource))


class Controller:
    """Owns the current snapshot, the key refresh loop and reloads."""

    def __init__(
        self,
        config_path: str | None,
        config: cfg.Config,
        metrics: Metrics,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        self.config_path = config_path
        self.env = env
        self.metrics = metrics
        self._lock = threading.Lock()  # one rebuild at a time; readers never take it
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._generation = 0
        # the key sources are built by the first refresh, off the start-up path: importing and
        # setting up a Redis client must not delay the milter's listening socket
        self._slots: list[_Slot] = []
        self._slots_built = False
        self.keys_loaded_once = False
        self.current = Runtime.build(config, KeySet())
        # the largest milter packet the server takes, fixed at start (a reload cannot raise it)
        self.max_packet = cfg.packet_limit(config)
        # who may connect; its names are resolved by the first refresh, off the start-up path
        self.peers = MtaPeers(config.mta_peers)
        self._outside_forwarding_hosts: list[cfg.IPNetwork] = []  # as last logged
        self.listening = False

    # --- key sources ---------------------------------------------------------------------

    def _make_slots(self, config: cfg.Config, old: list[_Slot]) -> list[_Slot]:
        slots = []
        for spec in config.keys.sources:
            # Always a new source: it reads the Redis password again, so a fixed password file
            # takes effect at SIGHUP. An unchanged spec keeps its last good keys.
            try:
                slot = _Slot(spec, make_source(spec, config, self.env), None)
            except SourceUnavailable as exc:
                slot = _Slot(spec, None, str(exc))
            previous = next((s for s in old if s.spec == spec), None)
            if previous is not None:
                slot.last, slot.up = previous.last, previous.up
            slots.append(slot)
        for s in old:  # their connection pools (the lock is held: no load is running)
            close = getattr(s.source, "close", None)
            if close is not None:
                close()
        return slots

    def _load_slots(self, slots: list[_Slot]) -> tuple[KeySet, bool]:
        """Ask every source; an unreachable one keeps its last keys. True when all answered."""
        all_ok = True
        for slot in slots:
            was_up = slot.up
            if slot.source is None:
                slot.up, all_ok = False, False
                if slot.warned:
                    continue
                slot.warned = True
                event(
                    logging.WARNING,
                    "key source unusable",
                    source=type(slot.spec).__name__,
                    error=slot.error,
                )
                continue
            try:
                slot.last = slot.source.load()
                slot.up = True
                slot.warned = False
            except SourceUnavailable as exc:
                slot.up, all_ok = False, False
                if not slot.warned:
                    slot.warned = True
                    event(
                        logging.WARNING,
                        "key source unreachable, keeping its last keys",
                        source=slot.source.name,
                        error=str(exc),
                        kept=0 if slot.last is None else len(slot.last.keys),
                    )
                continue
            if not was_up and slot.last is not None:
                event(
                    logging.INFO,
                    "key source answered",
                    source=slot.source.name,
                    keys=len(slot.last.keys),
                )
        keys = KeySet.combine(s.last for s in slots if s.last is not None)
        return keys, all_ok

    def refresh_keys(self) -> bool:
        """Reload the keys of the current config, then resolve the mta_peers names again
        (a slow DNS must not hold up the keys); returns True when every source answered."""
        with self._lock:
            old = self.current
            if not self._slots_built:
                self._slots = self._make_slots(old.config, [])
                self._slots_built = True
            keys, all_ok = self._load_slots(self._slots)
            self._publish(Runtime.build(old.config, keys), keys, all_ok)
        self.peers.resolve()
        return all_ok

    def _publish(self, runtime: Runtime, keys: KeySet, all_ok: bool) -> None:
        previous = self.current.keys
        self.current = runtime  # the swap: one reference, atomic for readers
        self.keys_loaded_once = self.keys_loaded_once or any(
            s.last is not None for s in self._slots
        )
        m = self.metrics
        m.key_refreshes.labels("ok" if all_ok else "partial").inc()
        if all_ok:
            m.key_refresh_last_success.set(time.time())
        counts: dict[str, int] = {}
        for slot in self._slots:
            counts[slot.name] = counts.get(slot.name, 0) + (len(slot.last.keys) if slot.last else 0)
        for name in SOURCE_KINDS:
            m.keys_loaded.labels(name).set(counts.get(name, 0))
        m.key_problems.set(len(keys.problems))
        outside = (
            []
            if keys.forwarding_hosts is None
            else outside_forwarding_hosts(runtime.config.relay_networks, keys.forwarding_hosts)
        )
        m.relay_networks_outside_forwarding_hosts.set(len(outside))
        if outside != self._outside_forwarding_hosts:
            self._outside_forwarding_hosts = outside
            for network in outside:
                event(logging.WARNING, forwarding_host_warning(network))
        redis = [s for s in self._slots if s.name == "redis"]
        m.redis_up.set(1 if redis and all(s.up for s in redis) else 0)
        if set(keys.by_domain) != set(previous.by_domain) or keys.problems != previous.problems:
            for problem in keys.problems:
                event(logging.WARNING, "key problem", problem=problem)
            event(
                logging.INFO,
                "keys loaded",
                domains=len(keys.by_domain),
                keys=len(keys),
                skipped=len(keys.problems),
            )

    # --- reload --------------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: a whole new config and key set, or nothing changes."""
        from .config import ConfigError, keep_restart_settings, load_config

        with self._lock:
            old = self.current
            try:
                _refuse_empty(self.config_path)
                config = load_config(self.config_path, self.env)
            except ConfigError as exc:
                self.metrics.reloads.labels("failed").inc()
                event(
                    logging.ERROR,
                    "reload failed, keeping the running config",
                    config=self.config_path,
                    problems=str(exc),
                )
                return False
            config, changed = keep_restart_settings(old.config, config, self.max_packet)
            for name in changed:
                event(
                    logging.WARNING,
                    "setting changed but needs a restart; old value kept",
                    setting=name,
                )
            slots = self._make_slots(config, self._slots)
            keys, all_ok = self._load_slots(slots)
            # resolved before the swap: the next connection meets a complete table
            peers = self.peers
            if config.mta_peers != old.config.mta_peers:
                peers = MtaPeers(config.mta_peers, previous=peers)
            peers.resolve()
            self._slots, self._slots_built = slots, True
            self._generation += 1
            self._publish(Runtime.build(config, keys), keys, all_ok)
            self.peers = peers
            self.metrics.reloads.labels("ok").inc()
            self.metrics.reload_last_success.set(time.time())
            logging.getLogger().setLevel(config.log_level.level)
            event(
                logging.INFO,
                "config reloaded",
                config=self.config_path,
                generation=self._generation,
                relay_networks=len(config.relay_networks),
            )
            warning = unguarded_listen_warning(config)
            if warning is not None:
                event(logging.WARNING, warning)
            self._wake.set()  # the refresh interval may have changed
            return True

    # --- the refresh loop ----------------------------------------------------------------

    def start_refresher(self) -> threading.Thread:
        thread = threading.Thread(target=self._refresh_loop, name="key-refresh", daemon=True)
        thread.start()
        return thread

    def _refresh_loop(self) -> None:
        backoff = 1.0
        while not self._stopped.is_set():
            try:
                ok = self.refresh_keys()
            except Exception:
                log.exception("key refresh failed")
                self.metrics.key_refreshes.labels("failed").inc()
                ok = False
            interval = self.current.config.keys.refresh_interval
            if ok:
                backoff = 1.0
                wait = interval
            else:  # a source is down: retry sooner, backing off up to the normal interval
                wait = min(backoff, interval)
                backoff = min(backoff * 2, interval)
            self._wake.wait(wait)
            self._wake.clear()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    def readiness(self) -> tuple[bool, str]:
        if not self.listening:
            return False, "milter not listening yet"
        if not self.keys_loaded_once:
            return False, "no key snapshot loaded yet"
        if len(self.current.keys) == 0:
            return False, "no usable keys"
        return True, "ready"


def _refuse_empty(path: str | None) -> None:
    """At reload an empty file is far more likely a write in progress than a wish for the
    built-in defaults (which would silently replace the relay networks and key sources)."""
    from .config import ConfigError

    if path is None:
        return
    try:
        with open(path, "rb") as f:
            empty = not f.read(65536).strip()
    except OSError:
        return  # load_config reports it
    if empty:
        raise ConfigError([f"{path}: the file is empty (a write in progress?); not reloaded"])
