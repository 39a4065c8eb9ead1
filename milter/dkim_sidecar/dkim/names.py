"""The one rule for signing domains (d=) and selectors (s=), wherever a name comes from: the
config, a key directory, Mailcow's Redis, a From: header, a DKIM-Signature.

RFC 6376 §3.1 writes a selector as dot-separated RFC 5321 sub-domains (letters, digits, inner
hyphens) and §3.5 d= as a domain name. The rule here also takes underscores, anywhere in a
label: they are valid DNS labels (RFC 2181 §11), every verifier looks them up, and Mailcow's UI
stores selectors of letters, digits, "-", "_" and "." (`functions.dkim.inc.php`), so a key an
admin made there is never refused here. Names are lowercased (DNS matches case-insensitively)
and U-labels become A-labels (RFC 5890), so that d= and s= are plain ASCII.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

__all__ = ["BadName", "a_label", "dns_name", "shown_name"]

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")
_SHOWABLE_NAME = re.compile(r"[^\t\n\r\f\v=+/]{1,80}\Z")


class BadName(ValueError):
    """Why a name is refused. The text never holds the name: callers show it as they may."""


def dns_name(text: str, what: Literal["domain", "selector"]) -> str:
    """`text` as a domain (at least two labels, the last not all digits) or a selector (one
    label or more): lowercased, one trailing dot dropped, U-labels as A-labels."""
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = ".".join(a_label(label) for label in name.split("."))
        except UnicodeError:
            raise BadName("not a valid internationalized name") from None
    if not name:
        raise BadName("empty")
    if len(name) > 253:
        raise BadName("longer than 253 characters")
    labels = name.split(".")
    for label in labels:
        # the reasons name no label: a name read from a misconfigured hash may be a key
        if not _LABEL.match(label):
            raise BadName(
                "a label is not 1-63 letters, digits, hyphens and underscores with no hyphen "
                "first or last"
            )
        if label.startswith("xn--"):
            # valid Punycode (RFC 3492); not Python's IDNA 2003 codec, which refuses labels
            # that IDNA 2008 allows (xn--strae-oqa, straße)
            try:
                label[4:].encode("ascii").decode("punycode")
            except UnicodeError:
                raise BadName("an xn-- label is not valid Punycode") from None
    if what == "domain":
        if len(labels) < 2:
            raise BadName("a signing domain needs at least two labels")
        if labels[-1].isdigit():
            raise BadName("the top-level label is all digits: an address is no domain")
    return name


def a_label(label: str) -> str:
    """One label as an A-label. Python's codec is IDNA 2003 (RFC 3490), which maps some
    labels onto another name (ß -> ss, final sigma -> sigma, ZWJ/ZWNJ dropped, compatibility
    forms) where IDNA 2008 (RFC 5890) keeps them apart: `straße` would be signed as `strasse`,
    someone else's domain. Only labels that map back to themselves are taken."""
    if label.isascii():
        return label
    encoded = label.encode("idna").decode("ascii")
    if encoded.encode("ascii").decode("idna") != unicodedata.normalize("NFC", label):
        raise UnicodeError(f"{label!r} is not the same name under IDNA 2008")
    return encoded


def shown_name(name: str) -> str:
    """A domain or selector as an error message may show it. Names can come from a hash that
    was misconfigured to hold keys (a PEM, a base64 seed): a value that cannot be a name
    (line breaks, tabs, base64's = + /, or long) is described, never shown."""
    if _SHOWABLE_NAME.match(name) and name.isprintable():
        return repr(name)
    return f"a value of {len(name)} characters (not shown: it cannot be a name)"
