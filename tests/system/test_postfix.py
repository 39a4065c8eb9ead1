"""Through a real Postfix: smtpd → dkim-sidecar (milter) → cleanup → smtp → sink. Every
message is read back byte-exact at the sink and judged by dkimpy with DNS from a table."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from dkim_sidecar.cli.keys import milter_map_lines
from dkim_sidecar.dkim.header import split_message
from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from harness.dkimcheck import signature_domains, verify_all
from harness.sidecar import Sidecar, write_keys

RELAY = "192.0.2.9"
RELAY6 = "2001:db8:1::5"
OUTSIDE = "198.51.100.7"
NETS = [
    f"{RELAY}/32",
    "[2001:db8:1::]/48",
    f"{OUTSIDE}/32",
]  # Postfix's own mynetworks for relaying


@pytest.fixture(scope="module")
def keyfiles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("keys")
    made = [
        ("example.com", "rsa", generate_key(Algorithm.RSA_SHA256, 2048)),
        ("example.com", "ed", generate_key(Algorithm.ED25519_SHA256)),
        ("example.org", "s1", generate_key(Algorithm.RSA_SHA256, 1024)),
    ]
    write_keys(d, made)
    dns = {}
    for domain, selector, pem in made:
        k = SigningKey.load(domain, selector, pem)
        dns[k.dns_name] = k.dns_record()
    return d, dns


def start_sidecar(tmp: Path, keydir: Path, **extra) -> Sidecar:
    config = {
        "relay_networks": ["192.0.2.0/24", "2001:db8:1::/48"],
        "keys": {"directory": str(keydir)},
        **extra,
    }
    return Sidecar(tmp, config).start()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, keyfiles):
    s = start_sidecar(tmp_path_factory.mktemp("sidecar"), keyfiles[0])
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log()


@pytest.fixture
def postfix(postfix_factory, sidecar):
    # tempfail, not Mailcow's accept: here a sidecar that is down or never asked fails the
    # delivery, so "no signature" always means the sidecar decided so
    return postfix_factory(
        f"{{ {sidecar.postfix_milter}, default_action=tempfail }}", extra_mynetworks=NETS
    )


def skipped(sidecar, reason: str) -> float:
    return sidecar.metric("dkim_sidecar_messages_total", outcome="skipped", reason=reason)


def message(
    frm: bytes = b"Alice <alice@example.com>", body: bytes = b"Hello.\r\n", extra=b""
) -> bytes:
    return (
        b"From: " + frm + b"\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: through postfix\r\n" + extra + b"\r\n" + body
    )


def deliver(postfix, data: bytes, addr: str | None, login: str | None = None) -> bytes:
    xclient = {}
    if addr:
        xclient["ADDR"] = ("IPV6:" + addr) if ":" in addr else addr
    if login:
        xclient["LOGIN"] = login
    before = len(postfix.sink.messages)
    r = postfix.send("alice@example.com", ["bob@example.net"], data, xclient=xclient or None)
    assert r.ok, (r.code, r.message, r.stage, postfix.log_tail())
    return postfix.sink.wait_for(before + 1, timeout=30)[-1].data


def without_received(data: bytes) -> bytes:
    """The message as it left the sink, less the (folded) Received fields Postfix added."""
    fields, body = split_message(data)
    return b"".join(f.raw for f in fields if f.name != "received") + b"\r\n" + body


def test_relay_client_is_dual_signed_and_verifies(postfix, keyfiles) -> None:
    got = deliver(postfix, message(), RELAY)
    assert signature_domains(got) == ["example.com", "example.com"]
    assert verify_all(got, keyfiles[1]) == [True, True]
    # Postfix added Message-ID and Date before the milter saw the message: both are signed
    head = got.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nmessage-id:" in head and b"\r\ndate:" in head


def test_ipv6_relay_client_is_signed(postfix, keyfiles) -> None:
    got = deliver(postfix, message(), RELAY6)
    assert verify_all(got, keyfiles[1]) == [True, True]


@pytest.mark.parametrize("addr", [None, OUTSIDE])
def test_client_outside_relay_networks_is_never_signed(postfix, sidecar, addr) -> None:
    # 127.0.0.1 (no XCLIENT) and 198.51.100.7 may relay through Postfix, but are not ours
    before = skipped(sidecar, "not_relay")
    got = deliver(postfix, message(), addr)
    assert signature_domains(got) == []
    # not_relay counts connects: after XCLIENT, Postfix connects the milter again for the
    # client it names (the test's own 127.0.0.1 was the first)
    assert skipped(sidecar, "not_relay") == before + (1 if addr is None else 2)


def test_authenticated_client_is_left_to_rspamd(postfix, sidecar) -> None:
    before = skipped(sidecar, "authenticated")
    got = deliver(postfix, message(), RELAY, login="bob")
    assert signature_domains(got) == []
    assert skipped(sidecar, "authenticated") == before + 1


def test_authenticated_client_is_signed_when_configured(
    postfix_factory, tmp_path, keyfiles
) -> None:
    s = start_sidecar(tmp_path, keyfiles[0], sign_authenticated=True)
    try:
        pf = postfix_factory(s.postfix_milter, extra_mynetworks=NETS)
        got = deliver(pf, message(), RELAY, login="bob")
        assert verify_all(got, keyfiles[1]) == [True, True]
    finally:
        assert s.stop() == 0


def test_already_signed_for_the_domain_is_not_signed_again(postfix, keyfiles) -> None:
    first = deliver(postfix, message(), RELAY)
    assert len(signature_domains(first)) == 2
    # what the sink got (signed) goes round once more: no third and fourth signature
    again = deliver(postfix, without_received(first), RELAY)
    assert signature_domains(again) == ["example.com", "example.com"]
    assert verify_all(again, keyfiles[1]) == [True, True]


def test_signature_of_another_domain_does_not_count(postfix, keyfiles) -> None:
    org = deliver(postfix, message(frm=b"<carol@example.org>"), RELAY)
    assert signature_domains(org) == ["example.org"]
    rewritten = without_received(org).replace(
        b"From: <carol@example.org>", b"From: <dan@example.com>"
    )
    got = deliver(postfix, rewritten, RELAY)
    assert signature_domains(got)[:2] == ["example.com", "example.com"]
    assert verify_all(got, keyfiles[1])[:2] == [True, True]


def test_folded_8bit_headers_and_whitespace_bodies_verify(postfix, keyfiles) -> None:
    extra = (
        b"Cc: Zo\xc3\xab <zoe@example.net>,\r\n\t  Yann <yann@example.net>\r\n"
        b"X-Long: one\r\n two\r\n\tthree   \r\n"
    )
    body = b"trailing spaces   \r\n\ttabbed\t\r\n\r\n\r\n  \r\nlast line\r\n\r\n\r\n\r\n"
    got = deliver(
        postfix, message(frm=b"J\xc3\xb6rg <joerg@example.com>", body=body, extra=extra), RELAY
    )
    assert verify_all(got, keyfiles[1]) == [True, True]
    assert b"\r\n\t  Yann <yann@example.net>\r\n" in got  # folds reached the sink as sent


def test_twenty_megabyte_message_is_signed_and_verifies(postfix, keyfiles) -> None:
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    body = line * (20 * 1024 * 1024 // len(line))
    got = deliver(postfix, message(body=body), RELAY)
    assert verify_all(got, keyfiles[1]) == [True, True]


def test_sidecar_down_with_default_action_accept_still_delivers(
    postfix_factory, tmp_path, keyfiles
) -> None:
    s = start_sidecar(tmp_path, keyfiles[0])
    pf = postfix_factory(f"{{ {s.postfix_milter}, default_action=accept }}", extra_mynetworks=NETS)
    assert len(signature_domains(deliver(pf, message(), RELAY))) == 2
    s.kill()
    got = deliver(pf, message(body=b"while it is down\r\n"), RELAY)
    assert signature_domains(got) == []  # delivered, unsigned


def test_smtpd_milter_maps_keeps_outside_clients_away_from_the_sidecar(
    postfix_factory, sidecar, keyfiles
) -> None:
    """The optional setup of config/postfix-extra.cf: only the relay networks reach the
    sidecar at all (Postfix picks the milter list by client address)."""
    pf = postfix_factory("", extra_mynetworks=NETS)
    table = pf.config_dir / "dkim_sidecar_milters.cidr"
    # the table as `dkim-sidecar postfix-map` writes it
    milters = f"{{ {sidecar.postfix_milter}, default_action=accept, connect_timeout=10s }}"
    table.write_text("\n".join(milter_map_lines([ip_network("192.0.2.0/24")], milters)) + "\n")
    table.chmod(0o644)
    pf.set_main_cf({"smtpd_milter_maps": f"cidr:{table}"})
    before = sidecar.metric("dkim_sidecar_messages_total", outcome="skipped", reason="not_relay")
    signed = deliver(pf, message(), RELAY)
    assert verify_all(signed, keyfiles[1]) == [True, True]
    outside = deliver(pf, message(), OUTSIDE)
    assert signature_domains(outside) == []
    # the outside session never reached the sidecar: no not_relay connection was counted
    after = sidecar.metric("dkim_sidecar_messages_total", outcome="skipped", reason="not_relay")
    assert after == before
