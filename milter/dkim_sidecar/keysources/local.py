"""Key sources behind one small interface, and the immutable key snapshot the milter reads.

A source returns every key it has (`load()`), or raises SourceUnavailable when its backend
cannot be reached (then the caller keeps that source's last good keys). A key that does not
parse is a problem of that one domain: it is reported, never raised, never printed.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..dkim.keys import KeyLoadError, SigningKey
from .files import FileTooLarge, NotRegularFile, read_small_file
from .specs import DirectorySource, TableSource

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Key files larger than this are not keys (an RSA-4096 PEM is about 3.3 KB).
MAX_KEY_FILE = 64 * 1024


class SourceUnavailable(Exception):
    """The backend of a key source cannot be reached now; the text is safe to log."""


@dataclass(frozen=True)
class SourceResult:
    """What one source holds: usable keys, and one line per key it could not use."""

    keys: tuple[SigningKey, ...] = ()
    problems: tuple[str, ...] = ()
    # Extra relay networks found by the source (Mailcow forwarding hosts), if asked for.
    networks: tuple[Network, ...] = ()
    # Every network Mailcow's rspamd whitelists as a forwarding host (whatever was typed), or
    # None when the source cannot tell: a relay network outside them gets rejected by rspamd.
    forwarding_hosts: tuple[Network, ...] | None = None


class KeySource(Protocol):
    """One place keys come from: a directory, an inline table, Mailcow's Redis."""

    @property
    def name(self) -> str: ...

    def load(self) -> SourceResult: ...


@dataclass(frozen=True)
class KeySet:
    """All keys by signing domain: an immutable snapshot, built once per refresh.

    A domain takes its keys from the first source that has it (the config's order), so a
    directory listed before Redis overrides Mailcow's key for that domain.
    """

    by_domain: Mapping[str, tuple[SigningKey, ...]] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()
    forwarding_hosts: tuple[Network, ...] | None = None

    @classmethod
    def combine(cls, results: Iterable[SourceResult]) -> KeySet:
        by_domain: dict[str, tuple[SigningKey, ...]] = {}
        problems: list[str] = []
        networks: list[Network] = []
        forwarding: list[Network] | None = None
        for result in results:
            if result.forwarding_hosts is not None:
                forwarding = [*(forwarding or ()), *result.forwarding_hosts]
            found: dict[str, list[SigningKey]] = {}
            for key in result.keys:
                found.setdefault(key.domain, []).append(key)
            for domain, keys in found.items():
                if domain not in by_domain:
                    # RSA first: the topmost signature is the one old verifiers look at
                    keys.sort(key=lambda k: (k.algorithm.value != "rsa-sha256", k.selector))
                    by_domain[domain] = tuple(keys)
            problems.extend(result.problems)
            networks.extend(result.networks)
        return cls(
            by_domain,
            tuple(problems),
            tuple(networks),
            None if forwarding is None else tuple(forwarding),
        )

    def lookup(
        self, domain: str, parent_fallback: bool = False
    ) -> tuple[str, tuple[SigningKey, ...]]:
        """The signing domain and its keys for an author domain; ("", ()) when none.

        With parent_fallback, `mail.example.com` may be signed with `example.com`'s key:
        still aligned under relaxed DMARC alignment (RFC 7489 §3.1.1).
        """
        keys = self.by_domain.get(domain)
        if keys:
            return domain, keys
        if parent_fallback:
            labels = domain.split(".")
            for i in range(1, len(labels) - 1):  # never fall back to a bare TLD
                parent = ".".join(labels[i:])
                keys = self.by_domain.get(parent)
                if keys:
                    return parent, keys
        return "", ()

    def __len__(self) -> int:
        return sum(len(keys) for keys in self.by_domain.values())


def _load_key_file(
    path: str, domain: str, selector: str, source: str, problems: list[str]
) -> SigningKey | None:
    """The key in a key file, or None with the reason added to `problems` (never its text)."""
    try:
        data = read_small_file(path, MAX_KEY_FILE)
        return SigningKey.load(domain, selector, data, source)
    except FileTooLarge as exc:
        problems.append(f"{path}: file of {exc.size} bytes is too large to be a key")
    except NotRegularFile:
        problems.append(f"{path}: not a regular file")
    except KeyLoadError as exc:
        problems.append(f"{path}: {exc}")
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror}")
    return None


@dataclass(frozen=True)
class DirectoryKeySource:
    """Key files named `<domain>.<selector>.key` in one directory (RSA or Ed25519, detected).

    The selector is the last dot-separated part before `.key` (selectors rarely hold dots;
    domains always do). Two files for one domain give two signatures: dual signing.
    """

    path: str

    @property
    def name(self) -> str:
        return DirectorySource.KIND

    def load(self) -> SourceResult:
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except FileNotFoundError:
            raise SourceUnavailable(f"key directory {self.path} does not exist") from None
        except OSError as exc:
            raise SourceUnavailable(f"key directory {self.path}: {exc.strerror}") from None
        keys: list[SigningKey] = []
        problems: list[str] = []
        for entry in entries:
            if not entry.name.endswith(".key") or entry.name.startswith("."):
                continue
            stem = entry.name[: -len(".key")]
            domain, dot, selector = stem.rpartition(".")
            if not dot or not domain:
                problems.append(f"{entry.path}: name is not <domain>.<selector>.key; file skipped")
                continue
            key = _load_key_file(entry.path, domain, selector, f"directory {self.path}", problems)
            if key is not None:
                keys.append(key)
        return SourceResult(tuple(keys), tuple(problems))


class TableEntry(Protocol):
    """One configured key (config.TableEntry has this shape)."""

    @property
    def domain(self) -> str: ...
    @property
    def selector(self) -> str: ...
    @property
    def key_file(self) -> str: ...


@dataclass(frozen=True)
class TableKeySource:
    """Keys listed one by one in the config: domain, selector, key file."""

    entries: Sequence[TableEntry]

    @property
    def name(self) -> str:
        return TableSource.KIND

    def load(self) -> SourceResult:
        keys: list[SigningKey] = []
        problems: list[str] = []
        for e in self.entries:
            key = _load_key_file(e.key_file, e.domain, e.selector, "table", problems)
            if key is not None:
                keys.append(key)
        return SourceResult(tuple(keys), tuple(problems))
