"""The key sources as the config describes them: one frozen spec per kind, validated once by
config/parse.py and handed as it is to the source it describes (runtime.make_source)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .files import read_password

__all__ = [
    "DEFAULT_KEY_DIRECTORY",
    "DirectorySource",
    "KeySource",
    "RedisSource",
    "TableEntry",
    "TableSource",
]

DEFAULT_KEY_DIRECTORY = "/etc/dkim-sidecar/keys"


@dataclass(frozen=True)
class DirectorySource:
    """Keys as files in a directory (the key-directory source defines the file layout)."""

    KIND: ClassVar[str] = "directory"  # the `source` label of dkim_sidecar_keys_loaded

    path: str = DEFAULT_KEY_DIRECTORY


@dataclass(frozen=True)
class TableEntry:
    domain: str
    selector: str
    key_file: str


@dataclass(frozen=True)
class TableSource:
    """Keys listed in the config: one entry per (domain, selector); a domain may have several
    (dual RSA + Ed25519 signing, or a second selector during rotation)."""

    KIND: ClassVar[str] = "table"
    entries: tuple[TableEntry, ...] = ()


@dataclass(frozen=True)
class RedisSource:
    """Mailcow's Redis, read-only.

    RSA keys: `HGET <selectors_hash> <domain>` → selector, `HGET <keys_hash> <selector>.<domain>`
    → PEM. With `ed25519_key_prefix` set, Ed25519 keys are read the same way from the hashes
    `<prefix>SELECTORS` and `<prefix>PRIV_KEYS` (value: PEM, or the base64 32-byte seed).

    The password is never stored here: `password_file` (its path) wins when set, otherwise the
    environment variable named by `password_env`; see `resolve_password`.
    """

    KIND: ClassVar[str] = "redis"
    host: str = "redis-mailcow"
    port: int = 6379
    db: int = 0
    username: str | None = None  # a Redis 6+ ACL user; None: the default user
    password_env: str | None = "REDISPASS"  # noqa: S105 - the variable's name, not a secret
    password_file: str | None = None
    selectors_hash: str = "DKIM_SELECTORS"
    keys_hash: str = "DKIM_PRIV_KEYS"
    pub_keys_hash: str = "DKIM_PUB_KEYS"
    ed25519_key_prefix: str | None = None
    timeout: float = 2.0

    @property
    def ed25519_selectors_hash(self) -> str | None:
        return None if self.ed25519_key_prefix is None else f"{self.ed25519_key_prefix}SELECTORS"

    @property
    def ed25519_keys_hash(self) -> str | None:
        return None if self.ed25519_key_prefix is None else f"{self.ed25519_key_prefix}PRIV_KEYS"

    def resolve_password(self, env: Mapping[str, str] = os.environ) -> str | None:
        """Read the password now (at connect time): the file if configured, else the
        environment variable; None when the variable is unset or empty (a Redis without
        requirepass).

        Raises PasswordError (naming the file or variable, never the value).
        """
        if self.password_file is not None:
            return read_password(None, self.password_file, env)
        name = self.password_env
        if name is None:
            return None
        if not env.get(name):
            return None
        return read_password(name, None, env)


KeySource = DirectorySource | TableSource | RedisSource
