"""Mailcow's Redis as a key source: the DKIM keys Mailcow's UI manages, read-only.

Where Mailcow keeps them (mailcow-dockerized `data/web/inc/functions.dkim.inc.php`; rspamd reads
the same hashes through `selector_prefix`/`key_prefix` in `data/conf/rspamd/local.d/
dkim_signing.conf`):

    DKIM_SELECTORS   <domain>            -> selector
    DKIM_PRIV_KEYS   <selector>.<domain> -> PEM private key (PKCS#8 when Mailcow generated it,
                                            as pasted (PKCS#1 too) when imported; LF line ends)
    DKIM_PUB_KEYS    <domain>            -> base64 SubjectPublicKeyInfo, the p= Mailcow's UI
                                            tells the admin to publish

Ed25519 (RFC 8463) is not something Mailcow stores. With `ed25519_key_prefix` set (for example
"DKIM_ED25519_") the same layout is read a second time, `<prefix>SELECTORS` and
`<prefix>PRIV_KEYS` (PEM or the bare base64 seed), so a domain signs with Mailcow's RSA key and an
Ed25519 key side by side (dual signing).

Forwarding hosts, read in the same round trip, are forwarding.py's business.

Only read commands are sent: AUTH when connecting, then HGETALL and HMGET (plus SELECT when
`db` is not 0; no CLIENT SETINFO). Mailcow's Redis has one user (`default`, password
REDISPASS), which may do everything; `keys.redis.username` lets the sidecar log in as a user
that may only read what it needs instead (the tests prove that this is enough), e.g.

    user dkim-sidecar on >PASSWORD -@all +hgetall +hmget ~DKIM_* ~WHITELISTED_FWD_HOST ~KEEP_SPAM

with `+select` added when `db` is not 0, and key patterns that cover the hash names if they
are not the defaults.

The password never appears in an error text, a log line or an exception chain.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..dkim.keys import Algorithm, KeyLoadError, SigningKey, check_dns_name
from .forwarding import (
    FWD_HOSTS_HASH,
    KEEP_SPAM_HASH,
    NetworksFrom,
    name_text,
    relay_networks,
    whitelisted,
)
from .local import Network, SourceResult, SourceUnavailable
from .specs import RedisSource

__all__ = ["NetworksFrom", "RedisKeySource"]

log = logging.getLogger("dkim_sidecar")

_B64_SPACE = re.compile(rb"\s+")


class RedisKeySource:
    """DKIM keys (and optionally relay networks) from Mailcow's Redis.

    One redis-py client per source (it pools its connections); nothing connects until the first
    `load()`, so building a source never waits for Redis. Every socket wait is bounded by
    `timeout` and redis-py's own retries are off: a Redis that accepts connections but does not
    answer ends a load after about `timeout` seconds, one that is down at once.
    """

    __slots__ = (
        "_client",
        "_ed_keys_hash",
        "_ed_selectors_hash",
        "_keys_hash",
        "_networks_from",
        "_password",
        "_pub_keys_hash",
        "_selectors_hash",
        "_timeout",
        "_username",
        "address",
        "db",
        "spec",
    )

    def __init__(
        self,
        spec: RedisSource,
        password: str | None = None,
        networks_from: NetworksFrom | None = None,
    ) -> None:
        """`spec` as the config validated it; the password read for it now (never kept in the
        spec); `networks_from`: which forwarding hosts become relay networks, if any."""
        self.spec = spec
        host, port = spec.host, spec.port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.db = spec.db
        self._username = spec.username
        self._password = password
        self._selectors_hash = spec.selectors_hash
        self._keys_hash = spec.keys_hash
        self._pub_keys_hash = spec.pub_keys_hash
        self._ed_selectors_hash = spec.ed25519_selectors_hash
        self._ed_keys_hash = spec.ed25519_keys_hash
        self._timeout = spec.timeout
        self._networks_from = networks_from
        self._client = redis.Redis(
            host=host,
            port=port,
            db=spec.db,
            username=spec.username,
            password=password,
            socket_connect_timeout=spec.timeout,
            socket_timeout=spec.timeout,
            decode_responses=False,
            # redis-py retries three times with backoff by default: that would stretch a
            # `timeout` into many. A connection the server closed (restart) is not a problem:
            # the pool notices at checkout and reconnects.
            retry=Retry(NoBackoff(), 0),
            # no CLIENT SETINFO: a read-only ACL user may not run it, and every refusal would
            # land in the admin's ACL LOG
            driver_info=None,
        )

    @property
    def name(self) -> str:
        return RedisSource.KIND

    def __repr__(self) -> str:
        return f"RedisKeySource({self.address}, db={self.db})"

    def close(self) -> None:
        """Close the pooled connections (at shutdown; a later load() reconnects)."""
        self._client.close()

    # -- reading ---------------------------------------------------------------------------

    def load(self) -> SourceResult:
        """All keys (and networks, if asked for) in two round trips: the selector hashes, then
        exactly the key fields they name. SourceUnavailable when Redis cannot be used."""
        try:
            data = self._fetch()
        except redis.RedisError as exc:
            failure = self._describe(exc)
        else:
            result = self._build(data)
            log.debug(
                "redis %s: %d keys, %d problems, %d networks",
                self.address,
                len(result.keys),
                len(result.problems),
                len(result.networks),
            )
            return result
        # Raised here, outside the handler, so that neither __cause__ nor __context__ holds
        # redis-py's exception: its traceback frames hold the connection and its password.
        raise SourceUnavailable(failure)

    def _fetch(self) -> _Fetched:
        ed_selectors = self._ed_selectors_hash
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(self._selectors_hash)
        if ed_selectors:
            pipe.hgetall(ed_selectors)
        # Always read: which relay networks rspamd will reject as spoofers (see _build)
        pipe.hgetall(FWD_HOSTS_HASH)
        if self._networks_from:
            pipe.hgetall(KEEP_SPAM_HASH)
        replies = iter(pipe.execute(raise_on_error=False))
        f = _Fetched()
        f.selectors = _as_hash(_raised(next(replies)))
        if ed_selectors:
            f.ed_selectors = _as_hash(_raised(next(replies)))
        fwd_hosts = next(replies)
        if self._networks_from:
            f.fwd_hosts = _as_hash(_raised(fwd_hosts))
            f.keep_spam = _as_hash(_raised(next(replies)))
        elif not isinstance(fwd_hosts, redis.RedisError):
            f.fwd_hosts = _as_hash(fwd_hosts)
        else:  # an ACL user without ~WHITELISTED_FWD_HOST: keys still load, no warning given
            f.fwd_hosts = None

        rsa_fields = [sel + b"." + dom for dom, sel in f.selectors.items()]
        rsa_domains = list(f.selectors)
        ed_fields = [sel + b"." + dom for dom, sel in f.ed_selectors.items()]
        if not rsa_fields and not ed_fields:
            return f
        pipe = self._client.pipeline(transaction=False)
        if rsa_fields:  # HMGET with no field is a syntax error
            pipe.hmget(self._keys_hash, rsa_fields)
            pipe.hmget(self._pub_keys_hash, rsa_domains)
        if ed_fields:
            pipe.hmget(str(self._ed_keys_hash), ed_fields)  # set: ed_fields came from it
        replies = iter(pipe.execute())
        if rsa_fields:
            f.priv = dict(zip(rsa_fields, _as_list(next(replies)), strict=True))
            f.pub = dict(zip(rsa_domains, _as_list(next(replies)), strict=True))
        if ed_fields:
            f.ed_priv = dict(zip(ed_fields, _as_list(next(replies)), strict=True))
        return f

    def _describe(self, exc: redis.RedisError) -> str:
        """One line for the log: what failed and what to check. Never the password."""
        where = f"redis {self.address}"
        detail = str(exc).strip()
        if isinstance(exc, redis.AuthenticationError):
            if self._password is None:
                text = f"{where}: authentication required, but no password is configured"
            elif self._username:
                # Redis says WRONGPASS alike for a wrong password and for a user it does not
                # have: one made with ACL SETUSER is gone after a Redis restart (no aclfile)
                text = (
                    f"{where}: user {self._username}: authentication failed (check that the "
                    "ACL user exists and is on (ACL LIST), and its password)"
                )
            else:
                text = (
                    f"{where}: authentication failed (check the password: REDISPASS in "
                    "mailcow.conf)"
                )
        elif isinstance(exc, redis.exceptions.BusyLoadingError):
            text = f"{where}: Redis is still loading its data set; will try again"
        elif isinstance(exc, redis.TimeoutError):
            text = f"{where}: no answer within {self._timeout:g} s"
        elif isinstance(exc, redis.ConnectionError):
            text = f"{where}: cannot connect: {detail}"
        elif isinstance(exc, redis.exceptions.NoPermissionError):
            text = (
                f"{where}: permission denied: {detail} (the ACL user needs +hgetall +hmget, "
                "+select when db is not 0, on keys matching the configured hash names)"
            )
        elif isinstance(exc, redis.ResponseError) and detail.startswith("WRONGTYPE"):
            text = f"{where}: {detail} (one of the configured hash names is not a hash)"
        elif isinstance(exc, redis.ResponseError):
            text = f"{where}: error reply: {detail}"
        else:
            text = f"{where}: {type(exc).__name__}: {detail}"
        # redis-py's texts do not carry credentials today; make sure it stays that way. Not by
        # masking: a short password masked inside a host name ("***-host") would give it away.
        if self._password and self._password in text:
            text = f"{where}: {type(exc).__name__} (its text withheld: it holds the password)"
        return text

    # -- building the result ---------------------------------------------------------------

    def _build(self, f: _Fetched) -> SourceResult:
        where = f"redis {self.address}"
        keys: list[SigningKey] = []
        problems: list[str] = []
        seen: set[tuple[str, str]] = set()
        rsa_selectors: dict[str, str] = {}

        rsa_hashes = (self._selectors_hash, self._keys_hash)
        for dom_b, domain, field, key in self._loaded(
            f.selectors, f.priv, rsa_hashes, "domain skipped", problems
        ):
            if self._duplicate(key, seen, problems):
                continue
            keys.append(key)
            rsa_selectors[key.domain] = key.selector
            # DKIM_PUB_KEYS is what Mailcow's UI shows the admin to publish. A mismatch is
            # reported but the key is still used: the admin may be mid-rotation (new key
            # imported, DNS not yet updated), and rspamd signs with the private key regardless,
            # so refusing here would only make the sidecar differ from Mailcow's own signer.
            pub = f.pub.get(dom_b)
            if pub is None:
                problems.append(
                    f"{where}: {self._pub_keys_hash} has no entry for {domain}; the key of "
                    f"{field} is used, but its published record cannot be checked"
                )
            elif not _same_public_key(key, pub):
                problems.append(
                    f"{where}: published {self._pub_keys_hash} for {domain} does not match the "
                    f"private key of {field}; signing with the private key anyway (check the "
                    f"TXT record at {key.dns_name})"
                )

        ed_hashes = (str(self._ed_selectors_hash), str(self._ed_keys_hash))
        for _, domain, field, key in self._loaded(
            f.ed_selectors, f.ed_priv, ed_hashes, "Ed25519 key skipped", problems
        ):
            if key.algorithm is not Algorithm.ED25519_SHA256:
                problems.append(
                    f"{where}: {self._ed_keys_hash} {field} holds an {key.algorithm.key_type} key, "
                    "not Ed25519; key skipped"
                )
                continue
            if rsa_selectors.get(key.domain) == key.selector:
                # one selector is one DNS record: both keys cannot be published there
                problems.append(
                    f"{where}: {domain} uses selector {key.selector} for both its RSA and its "
                    "Ed25519 key; Ed25519 key skipped (give it a selector of its own)"
                )
                continue
            if self._duplicate(key, seen, problems):
                continue
            keys.append(key)

        networks: list[Network] = []
        if self._networks_from:
            networks = relay_networks(
                f.fwd_hosts or {}, f.keep_spam, self._networks_from, where, problems
            )
        return SourceResult(tuple(keys), tuple(problems), tuple(networks), whitelisted(f.fwd_hosts))

    def _loaded(
        self,
        selectors: dict[bytes, bytes],
        private: dict[bytes, bytes | None],
        hashes: tuple[str, str],
        skipped: str,
        problems: list[str],
    ) -> Iterator[tuple[bytes, str, str, SigningKey]]:
        """(domain as stored, domain, "<selector>.<domain>", key) for each entry of a selectors
        hash whose key is in its private-key hash and loads; the others are reported. Names
        are checked before any text shows them: a hash configured by mistake may hold keys
        where names belong."""
        where = f"redis {self.address}"
        for dom_b, sel_b in sorted(selectors.items()):
            domain, selector = name_text(dom_b), name_text(sel_b)
            try:
                check_dns_name(domain, "domain")
                check_dns_name(selector, "selector")
            except KeyLoadError as exc:
                problems.append(f"{where}: {exc}; skipped")
                continue
            field = f"{selector}.{domain}"
            data = private.get(sel_b + b"." + dom_b)
            if data is None:
                problems.append(
                    f"{where}: {hashes[0]} names selector {selector} for {domain}, but "
                    f"{hashes[1]} has no {field}; {skipped}"
                )
                continue
            key = self._load_key(domain, selector, data, problems)
            if key is not None:
                yield dom_b, domain, field, key

    def _load_key(
        self, domain: str, selector: str, data: bytes, problems: list[str]
    ) -> SigningKey | None:
        try:
            return SigningKey.load(domain, selector, data, f"redis {self.address}")
        except KeyLoadError as exc:
            problems.append(str(exc))  # names selector and domain, never the key
            return None

    def _duplicate(self, key: SigningKey, seen: set[tuple[str, str]], problems: list[str]) -> bool:
        if (key.domain, key.selector) in seen:
            # two spellings of one domain (Example.org, example.org) in one hash
            problems.append(
                f"redis {self.address}: {key.dns_name} is given twice; the second is skipped"
            )
            return True
        seen.add((key.domain, key.selector))
        return False


class _Fetched:
    """The raw hash contents of one load (bytes, as Redis holds them)."""

    __slots__ = ("ed_priv", "ed_selectors", "fwd_hosts", "keep_spam", "priv", "pub", "selectors")

    def __init__(self) -> None:
        self.selectors: dict[bytes, bytes] = {}
        self.priv: dict[bytes, bytes | None] = {}
        self.pub: dict[bytes, bytes | None] = {}
        self.ed_selectors: dict[bytes, bytes] = {}
        self.ed_priv: dict[bytes, bytes | None] = {}
        self.fwd_hosts: dict[bytes, bytes] | None = {}  # None: not readable (ACL)
        self.keep_spam: dict[bytes, bytes] = {}


def _raised(reply: Any) -> Any:
    """A pipeline reply, or the error it holds raised (execute(raise_on_error=False))."""
    if isinstance(reply, Exception):
        raise reply
    return reply


def _as_hash(reply: Any) -> dict[bytes, bytes]:
    if not isinstance(reply, dict):
        raise redis.exceptions.InvalidResponse(f"expected a hash, got {type(reply).__name__}")
    return {k: v for k, v in reply.items() if isinstance(k, bytes) and isinstance(v, bytes)}


def _as_list(reply: Any) -> list[bytes | None]:
    if not isinstance(reply, list):
        raise redis.exceptions.InvalidResponse(f"expected a list, got {type(reply).__name__}")
    return [v if isinstance(v, bytes) else None for v in reply]


def _same_public_key(key: SigningKey, published: bytes) -> bool:
    """Whether Mailcow's base64 SubjectPublicKeyInfo is the public half of `key`. Compared as
    DER, so that line breaks or spaces pasted into the hash do not count as a difference."""
    try:
        der = base64.b64decode(_B64_SPACE.sub(b"", published), validate=True)
    except (binascii.Error, ValueError):
        return False
    return der == base64.b64decode(key.public_key_b64())
