"""DKIM signing keys: parsing, checking, signing, the DNS record. Pure: no I/O.

Error texts never carry key material: they say what is wrong with the key, not what it holds.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from .names import BadName, dns_name, shown_name

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

RSA_MIN_BITS = 1024  # RFC 8301 §3.2: signers MUST use at least 1024 bits
RSA_MAX_BITS = 4096  # RFC 8301 §3.2: verifiers need only handle up to 4096 bits


class KeyLoadError(ValueError):
    """A key that cannot be used; the text says why, never what the key holds."""


class Algorithm(enum.Enum):
    """The a= tag (RFC 6376 §3.3, RFC 8463 §3)."""

    RSA_SHA256 = "rsa-sha256"
    ED25519_SHA256 = "ed25519-sha256"

    @property
    def key_type(self) -> str:
        """The k= tag of the DNS record."""
        return "rsa" if self is Algorithm.RSA_SHA256 else "ed25519"


def check_dns_name(name: str, what: Literal["domain", "selector"] = "domain") -> str:
    """A domain or selector by the one rule (names.dns_name), or KeyLoadError that shows the
    value only if it can be a name."""
    try:
        return dns_name(name, what)
    except BadName as exc:
        raise KeyLoadError(f"{shown_name(name)} is not a valid {what} name ({exc})") from None


def parse_private_key(data: bytes) -> PrivateKey:
    """Read an RSA or Ed25519 private key.

    Accepts PEM PKCS#8 (`BEGIN PRIVATE KEY`, what Mailcow generates), PEM PKCS#1
    (`BEGIN RSA PRIVATE KEY`, what Mailcow stores for imported keys), LF or CRLF line ends,
    and the bare base64 Ed25519 seed of RFC 8463 and dkimpy.
    """
    text = data.strip()
    if not text:
        raise KeyLoadError("the key is empty")
    if text.startswith(b"-----BEGIN"):
        # PKCS#8 says so in its first line, legacy PKCS#1 in a Proc-Type line after it
        if b"ENCRYPTED" in b"\n".join(text.split(b"\n", 3)[:3]):
            raise KeyLoadError(
                "the key is encrypted with a passphrase; an unencrypted key is needed"
            )
        try:
            key = serialization.load_pem_private_key(text.replace(b"\r\n", b"\n"), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyLoadError(
                "not a readable PEM private key (PKCS#8 or PKCS#1 expected)"
            ) from None
    else:
        try:
            raw = base64.b64decode(b"".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise KeyLoadError("neither a PEM private key nor a base64 Ed25519 seed") from None
        if len(raw) != 32:
            raise KeyLoadError(
                f"base64 data of {len(raw)} bytes is not an Ed25519 seed (32 bytes expected)"
            )
        key = ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    if isinstance(key, rsa.RSAPrivateKey):
        bits = key.key_size
        if bits < RSA_MIN_BITS:
            raise KeyLoadError(
                f"RSA key of {bits} bits is too small (at least {RSA_MIN_BITS}, RFC 8301 §3.2)"
            )
        if bits > RSA_MAX_BITS:
            raise KeyLoadError(
                f"RSA key of {bits} bits is too large: verifiers need only handle up to "
                f"{RSA_MAX_BITS} bits (RFC 8301 §3.2)"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise KeyLoadError(f"unsupported key type {type(key).__name__} (RSA or Ed25519 expected)")


@functools.lru_cache(maxsize=1024)
def _parse_cached(data: bytes) -> PrivateKey:
    """Parsing checks the whole key (about 50 ms for RSA-2048 here): a refresh every minute
    over many Mailcow domains would spend seconds of CPU on keys that did not change.
    Unchanged key bytes give the parsed key back; errors are not cached."""
    return parse_private_key(data)


_PKCS1V15 = padding.PKCS1v15()
_PREHASHED_SHA256 = utils.Prehashed(hashes.SHA256())


@dataclass(frozen=True)
class SigningKey:
    """A private key bound to its domain and selector: what one DKIM signature needs."""

    domain: str
    selector: str
    key: PrivateKey = field(repr=False, compare=False)
    source: str = "inline"
    # per message these are asked for several times; isinstance() against cryptography's
    # ABCs costs more than the answer is worth, so it is asked once
    algorithm: Algorithm = field(init=False, compare=False)
    _sign: Callable[[bytes], bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = self.key
        sign: Callable[[bytes], bytes]
        if isinstance(key, rsa.RSAPrivateKey):
            algorithm = Algorithm.RSA_SHA256

            def sign(digest: bytes) -> bytes:
                return key.sign(digest, _PKCS1V15, _PREHASHED_SHA256)
        else:
            algorithm, sign = Algorithm.ED25519_SHA256, key.sign
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "_sign", sign)

    @classmethod
    def load(cls, domain: str, selector: str, data: bytes, source: str = "inline") -> SigningKey:
        """Check names and parse the key; KeyLoadError names domain and selector, never the key."""
        try:  # these errors show a value only if it can be a name: never a key
            d = check_dns_name(domain, "domain")
            s = check_dns_name(selector, "selector")
        except KeyLoadError as exc:
            raise KeyLoadError(f"{source}: {exc}") from None
        try:
            return cls(d, s, _parse_cached(data), source)
        except KeyLoadError as exc:
            raise KeyLoadError(f"{s}._domainkey.{d} ({source}): {exc}") from None

    @property
    def bits(self) -> int:
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.key_size
        return 256

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a SHA-256 digest of the canonical header data.

        rsa-sha256: RSASSA-PKCS1-v1_5 over SHA-256 (RFC 6376 §3.3.1).
        ed25519-sha256: PureEdDSA over the 32-byte SHA-256 digest itself (RFC 8463 §3).
        """
        return self._sign(digest)

    def public_key_bytes(self) -> bytes:
        """The p= key data: SubjectPublicKeyInfo for RSA (RFC 6376 §3.6.1), the raw 32-byte
        public key for Ed25519 (RFC 8463 §4.2)."""
        pub = self.key.public_key()
        if isinstance(pub, ed25519.Ed25519PublicKey):
            return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_key_b64(self) -> str:
        """The p= value."""
        return base64.b64encode(self.public_key_bytes()).decode("ascii")

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_record(self) -> str:
        """The TXT record to publish at dns_name (RFC 6376 §3.6.1)."""
        return f"v=DKIM1; k={self.algorithm.key_type}; p={self.public_key_b64()}"


def generate_key(algorithm: Algorithm, bits: int = 2048) -> bytes:
    """A new private key as PEM PKCS#8 (for the demo and the key tool)."""
    key: PrivateKey
    if algorithm is Algorithm.RSA_SHA256:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- the published key record (RFC 6376 §3.6.1) ----------------------------------------------


_TAG = re.compile(rb"^\s*([A-Za-z][A-Za-z0-9_]*)\s*=(.*)$", re.S)


def parse_tag_list(value: bytes) -> tuple[dict[str, bytes], list[str]]:
    """RFC 6376 §3.2 tag=value list, for DKIM-Signature fields (§3.5) and key records
    (§3.6.1): tag -> value (folds removed, FWS trimmed; the first of a repeated tag), and what
    makes the list invalid (an entry that is not tag=value, a tag given twice). A key record
    must be refused then; a signature found in a message is read for what it has."""
    tags: dict[str, bytes] = {}
    problems: list[str] = []
    entries = value.split(b";")
    if entries and not entries[-1].strip():
        entries.pop()  # a trailing ";"
    for entry in entries:
        m = _TAG.match(entry)
        if m is None:
            problems.append(f"{entry.strip().decode('ascii', 'replace')!r} is not tag=value")
            continue
        name = m.group(1).decode("ascii")
        if name in tags:
            problems.append(f"tag {name}= given twice")
            continue
        tags[name] = b"".join(m.group(2).split(b"\r\n")).strip()
    return tags, problems


def check_published(key: SigningKey, records: list[bytes]) -> tuple[bool, str]:
    """Does what DNS holds at key.dns_name let a verifier check this key's signatures?
    `records`: each TXT record there, its strings joined. (ok, what to tell the admin)."""
    if not records:
        return False, f"no TXT record at {key.dns_name}"
    if len(records) > 1:
        # §3.6.2.2: TXT records must be unique for a selector; with several, results are undefined
        return False, f"{len(records)} TXT records at {key.dns_name}; publish exactly one"
    if not records[0].isascii():
        return False, "not a DKIM key record: it holds non-ASCII octets"
    raw, invalid = parse_tag_list(records[0])
    if invalid:
        return False, f"not a DKIM key record: {invalid[0]}"
    tags = {name: value.decode("ascii") for name, value in raw.items()}
    if "v" in tags and tags["v"] != "DKIM1":
        return False, f"v={tags['v']}: not a DKIM key record"
    if "v" in tags and next(iter(tags)) != "v":
        return False, "v=DKIM1 must be the first tag"
    want = key.algorithm.key_type
    if "k" not in tags and want != "rsa":
        return False, f"no k= tag (which means k=rsa), but the key is {want}: add k={want}"
    # tag, the value it must list, what to say when it does not
    for tag, needed, wrong in (
        ("k", want, f", but the key is {want}"),
        ("h", "sha256", " does not allow sha256"),
        ("s", "email", ": not for email"),
    ):
        if tag not in tags:
            continue
        values = [v.strip() for v in tags[tag].split(":")]
        if needed in values or (tag == "s" and "*" in values):
            continue
        if needed in [v.lower() for v in values]:
            # some verifiers compare case-blind (OpenDKIM), others do not (dkimpy)
            return False, f"{tag}={tags[tag]}: write it in lower case; some verifiers reject it"
        return False, f"{tag}={tags[tag]}{wrong}"
    if "p" not in tags:
        return False, "no p= tag"
    p = "".join(tags["p"].split())
    if not p:
        return False, "p= is empty: the key is revoked"
    try:
        published = base64.b64decode(p, validate=True)
    except binascii.Error:
        return False, "p= is not base64"
    if published != key.public_key_bytes():
        if _same_rsa_key(key, published):
            pass  # the bare RSAPublicKey form: verifiers take it too
        elif _wrapped_ed25519(key, published):
            return False, (
                "p= holds this key as SubjectPublicKeyInfo; an ed25519 record takes the bare "
                "32-byte key (RFC 8463 §4.2): publish the record `keys` prints"
            )
        else:
            return False, "p= is a different key (the record does not match this private key)"
    flags = {f.strip() for f in tags.get("t", "").split(":")}
    if "y" in flags:
        return True, "ok (t=y: testing mode; receivers may treat signatures as unsigned)"
    return True, "ok"


def _wrapped_ed25519(key: SigningKey, published: bytes) -> bool:
    if not isinstance(key.key, ed25519.Ed25519PrivateKey):
        return False
    return published == key.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _same_rsa_key(key: SigningKey, published: bytes) -> bool:
    """An RSA p= may hold the bare RSAPublicKey (PKCS#1) instead of SubjectPublicKeyInfo;
    verifiers accept both."""
    if not isinstance(key.key, rsa.RSAPrivateKey):
        return False
    try:
        loaded = serialization.load_der_public_key(published)
    except (ValueError, UnsupportedAlgorithm):
        return False
    return (
        isinstance(loaded, rsa.RSAPublicKey)
        and loaded.public_numbers() == key.key.public_key().public_numbers()
    )
