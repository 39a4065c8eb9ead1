"""The real-parts harness itself, with NO milter: Postfix relays to the sink unchanged, and
dkimcheck really verifies (and really fails)."""

from __future__ import annotations

import base64
import hashlib
import smtplib
import socket
import subprocess
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import dkimcheck, skips
from harness.postfix import (
    PostfixError,
    PostfixInstance,
    has_ipv6_loopback,
    postmap_query,
)
from harness.sink import SinkMessage, SmtpSink
from harness.threads import call_in_thread

SENDER = "alice@example.com"
RCPT = "bob@example.net"

# Headers complete (Date, Message-ID present) so Postfix only prepends Received:.
HEADERS = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: harness test\r\n"
    b"Date: Sat, 28 Nov 2026 09:00:00 +0000\r\n"
    b"Message-ID: <harness-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
)

# Things that a re-serializing hop would change: dot lines, trailing blanks, tabs,
# blank lines at the end, a "From " line, long-ish lines (under 998).
TRICKY_BODY = (
    b"Hello Bob,\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b". dot space\r\n"
    b"trailing spaces   \r\n"
    b"\ttab indented\t\r\n"
    b"From the start of a line\r\n"
    b"x" * 990 + b"\r\n" + b"\r\n" + b"\r\n"
)


def _message(body: bytes, headers: bytes = HEADERS) -> bytes:
    return headers + b"\r\n" + body


def _only_received_prepended(got: SinkMessage, sent: bytes) -> None:
    """Postfix may only have prepended its Received: field; the rest is byte-identical."""
    assert got.data.endswith(sent), "message changed in transit"
    prefix = got.data[: len(got.data) - len(sent)]
    assert prefix.startswith(b"Received: "), prefix[:200]
    assert prefix.count(b"\r\nReceived: ") == 0, prefix  # exactly one new field
    assert prefix.endswith(b"\r\n")


def _relay(pf: PostfixInstance, message: bytes, **kw: object) -> SinkMessage:
    result = pf.send(SENDER, [RCPT], message, **kw)  # type: ignore[arg-type]
    assert result.ok, f"{result}\n{pf.log_tail()}"
    assert pf.sink is not None
    got = pf.sink.wait_for(1, timeout=60)
    pf.wait_queue_empty(timeout=60)
    assert len(got) == 1
    assert got[0].mail_from == SENDER
    assert got[0].rcpt_tos == [RCPT]
    return got[0]


# --- the sink on its own ------------------------------------------------------------------


def test_sink_stores_data_byte_exact_and_unstuffed(smtp_sink: SmtpSink) -> None:
    msg = _message(TRICKY_BODY)
    with smtplib.SMTP("127.0.0.1", smtp_sink.port, timeout=10) as c:
        code, _ = c.ehlo("client.test")
        assert code == 250
        assert c.has_extn("8bitmime") and c.has_extn("smtputf8")
        assert int(c.esmtp_features["size"]) >= 60 * 1024 * 1024
        assert c.sendmail(SENDER, [RCPT, "carol@example.org"], msg) == {}
    (got,) = smtp_sink.wait_for(1, timeout=60)
    assert got.data == msg
    assert got.body == TRICKY_BODY
    assert got.rcpt_tos == [RCPT, "carol@example.org"]
    assert got.helo == "client.test"


def test_sink_wait_for_times_out(smtp_sink: SmtpSink) -> None:
    """No message comes: wait_for gives up and says how many did. In a thread, so that one
    that never gives up fails here instead of hanging the suite."""
    with pytest.raises(TimeoutError, match=r"0 of 1 messages after 0\.2s"):
        call_in_thread(lambda: smtp_sink.wait_for(1, timeout=0.2))


# --- Postfix -> sink ------------------------------------------------------------------------


def test_body_and_headers_pass_byte_exact(postfix_factory) -> None:
    pf = postfix_factory()
    msg = _message(TRICKY_BODY)
    got = _relay(pf, msg)
    assert got.body == TRICKY_BODY
    _only_received_prepended(got, msg)
    queue_id = pf.send(SENDER, RCPT, msg).queue_id
    assert f"id {queue_id}".encode() in pf.sink.wait_for(2, timeout=60)[1].data
    assert "status=sent" in pf.read_log()


BARE = b"From: alice\r\nTo: bob@example.net\r\nSubject: s\r\n\r\nbody\r\n"


@pytest.mark.parametrize("xclient", [None, {"ADDR": "192.0.2.9"}])
def test_cleanup_edits_headers_for_local_clients(postfix_factory, xclient) -> None:
    """Trap 6 of harness.postfix, pinned: a client on 127.0.0.1 gets Date/Message-ID added
    and unqualified header addresses completed, even when XCLIENT says 192.0.2.9."""
    pf = postfix_factory(extra_mynetworks=["192.0.2.0/24"])
    got = _relay(pf, BARE, xclient=xclient)
    assert b"\r\nFrom: alice@mta.harness.test\r\n" in got.header_block
    assert b"\r\nMessage-Id: <" in got.header_block
    assert b"\r\nDate: " in got.header_block
    assert got.body == b"body\r\n"


def test_header_edits_can_be_turned_off(postfix_factory) -> None:
    pf = postfix_factory(extra_main_cf={"local_header_rewrite_clients": ""})
    got = _relay(pf, BARE)
    _only_received_prepended(got, BARE)


def test_xclient_session_still_relays(postfix_factory) -> None:
    pf = postfix_factory(extra_mynetworks=["192.0.2.0/24"])
    msg = _message(b"via XCLIENT\r\n")
    got = _relay(pf, msg, xclient={"ADDR": "192.0.2.9", "LOGIN": "bob"})
    assert got.body == b"via XCLIENT\r\n"
    received = got.data.split(b"\r\n\t")[0]
    assert b"[192.0.2.9]" in received, got.data[:300]
    assert "client=unknown[192.0.2.9]" in pf.read_log()


def test_xclient_address_really_replaces_the_client(postfix_factory) -> None:
    """Without 192.0.2.0/24 in mynetworks the XCLIENT'ed session is a stranger: no relay."""
    pf = postfix_factory()
    result = pf.send(SENDER, [RCPT], _message(b"x\r\n"), xclient={"ADDR": "192.0.2.9"})
    assert result.stage == "rcpt" and result.code == 554, result
    assert b"Relay access denied" in result.message


def test_8bit_body_passes_unchanged(postfix_factory) -> None:
    pf = postfix_factory()
    body = (
        "Grüße aus Köln, naïve café ✓\r\n".encode()
        + bytes(range(0x80, 0x100))
        + b"\r\n"
        + "日本語のテキスト\r\n".encode()
    )
    headers = HEADERS.replace(b"Subject: harness test", "Subject: Grüße".encode()) + (
        b"Content-Transfer-Encoding: 8bit\r\n"
    )
    msg = _message(body, headers)
    got = _relay(pf, msg)
    assert got.body == body
    _only_received_prepended(got, msg)
    assert "BODY=8BITMIME" in got.mail_options


def test_20mb_message_passes(postfix_factory) -> None:
    pf = postfix_factory()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n"
    body = line * (20 * 1024 * 1024 // len(line) + 1)
    msg = _message(body)
    result = pf.send(SENDER, [RCPT], msg)
    assert result.ok, f"{result}\n{pf.log_tail()}"
    (got,) = pf.sink.wait_for(1, timeout=60)
    assert len(got.body) == len(body) > 20 * 1024 * 1024
    assert hashlib.sha256(got.body).digest() == hashlib.sha256(body).digest()
    _only_received_prepended(got, msg)


def test_delivery_through_ipv6_loopback(postfix_factory) -> None:
    if not has_ipv6_loopback():
        skips.machine_cannot("bind ::1 (no IPv6 loopback)")
    pf = postfix_factory()
    assert pf.host6 == "::1"
    msg = _message(b"over IPv6\r\n")
    got = _relay(pf, msg, host="::1")
    assert got.body == b"over IPv6\r\n"
    assert b"[IPv6:::1]" in got.data.split(b"\r\n\t")[0], got.data[:300]


def _banner(pf: PostfixInstance) -> bytes:
    with socket.create_connection((pf.host, pf.port), timeout=10) as s:
        s.settimeout(10)
        data = s.recv(512)
        s.sendall(b"QUIT\r\n")
    return data


def test_reload_applies_new_main_cf(postfix_factory) -> None:
    pf = postfix_factory()
    assert b"ESMTP harness" in _banner(pf)
    pf.set_main_cf({"smtpd_banner": "$myhostname ESMTP reloaded"})  # reloads
    assert _banner(pf).startswith(b"220 mta.harness.test ESMTP reloaded")
    assert _relay(pf, _message(b"after reload\r\n")).body == b"after reload\r\n"


def test_postmap_query_tells_not_found_from_failure(tmp_path) -> None:
    """A tool's failure is never read as an answer: postmap exits 1 for "not found" and for a
    fatal error alike."""
    table = tmp_path / "t.cidr"
    table.write_text("192.0.2.0/24\tfound\n")
    etc = tmp_path / "etc"
    assert postmap_query(f"cidr:{table}", "192.0.2.9", etc) == "found"
    assert postmap_query(f"cidr:{table}", "198.51.100.1", etc) is None
    with pytest.raises(PostfixError, match=r"missing\.cidr"):
        postmap_query(f"cidr:{tmp_path / 'missing.cidr'}", "192.0.2.9", etc)


def test_host_configuration_is_out_of_reach(tmp_path) -> None:
    """The session guard: a test that reads host configuration fails on every machine, not
    only on a fresh one."""
    from harness import hostguard

    with pytest.raises(hostguard.HostStateError, match=r"/etc/postfix/main\.cf"):
        open("/etc/postfix/main.cf")  # noqa: SIM115 (the open itself is what is refused)
    with pytest.raises(hostguard.HostStateError, match=r"/etc/dkim-sidecar/config\.yml"):
        Path("/etc/dkim-sidecar/config.yml").read_text()
    p = subprocess.run(
        ["/usr/sbin/postmap", "-q", "x", "inline:{x=y}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode != 0 and hostguard.NO_MAIL_CONFIG in p.stderr, p.stderr


def test_start_stop_leave_nothing(smtp_sink: SmtpSink) -> None:
    pf = PostfixInstance(smtp_sink.port)
    try:
        pf.start()
        pid = pf.master_pid()
        assert pid is not None
        pf.stop()
        assert pf.master_pid() is None
        # a second start of the same instance (quick-start path)
        pf.start()
        assert pf.send(SENDER, [RCPT], _message(b"again\r\n")).ok
        assert smtp_sink.wait_for(1, timeout=60)[0].body == b"again\r\n"
    finally:
        pf.cleanup()
    assert not pf.base.exists()
    assert pf.master_pid() is None


def test_wait_queue_empty_times_out_when_the_sink_is_down(smtp_sink: SmtpSink) -> None:
    port = smtp_sink.port
    smtp_sink.stop()
    with PostfixInstance(port) as pf:
        assert pf.send(SENDER, [RCPT], _message(b"stuck\r\n")).ok
        with pytest.raises(TimeoutError, match="queue not empty"):
            pf.wait_queue_empty(timeout=0.5)
        pf.wait_for_log(r"status=deferred", timeout=60)


# --- dkimcheck --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)


def _sign(
    message: bytes, pem: bytes, canon: tuple[bytes, bytes] = (b"relaxed", b"relaxed")
) -> bytes:
    sig = dkim.sign(
        message,
        b"sel",
        b"example.com",
        pem,
        canonicalize=canon,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return sig + message


def test_dkimcheck_verifies_and_detects_a_one_byte_change(rsa_key: tuple[bytes, bytes]) -> None:
    pem, record = rsa_key
    dns = {"sel._domainkey.example.com.": record}
    signed = _sign(_message(b"Hello Bob\r\n"), pem)
    assert dkimcheck.signature_domains(signed) == ["example.com"]
    assert dkimcheck.verify_all(signed, dns) == [True]
    assert dkimcheck.verify(signed, dns) is True
    assert dkimcheck.verify(signed, {"sel._domainkey.example.com": record})  # no trailing dot
    assert dkimcheck.verify(signed, {b"sel._domainkey.example.com.": record})  # bytes key

    tampered = signed.replace(b"Hello Bob", b"Hello Bot")
    assert len(tampered) == len(signed) and tampered != signed
    assert dkimcheck.verify_all(tampered, dns) == [False]
    assert dkimcheck.verify(tampered, dns) is False
    (res,) = dkimcheck.verify_results(tampered, dns)
    assert "body hash mismatch" in res.error

    header_tampered = signed.replace(b"Subject: harness test", b"Subject: harness tesT")
    assert dkimcheck.verify(header_tampered, dns) is False
    assert dkimcheck.verify(signed, {}) is False  # key not in DNS
    assert dkimcheck.verify(_message(b"unsigned\r\n"), dns) is False  # no signature at all


def test_dkimcheck_multiple_signatures_in_dkimpy_order(rsa_key: tuple[bytes, bytes]) -> None:
    pem, record = rsa_key
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    inner = _sign(_message(b"two signers\r\n"), pem)  # d=example.com, bottom
    outer = (
        dkim.sign(inner, b"s2", b"example.org", other_pem, include_headers=[b"from"]) + inner
    )  # d=example.org, top
    dns = {"sel._domainkey.example.com": record}
    assert dkimcheck.signature_domains(outer) == ["example.org", "example.com"]
    assert dkimcheck.verify_all(outer, dns) == [False, True]  # example.org key not published
    assert dkimcheck.verify(outer, dns) is False
    assert dkimcheck.verify(outer, dns, domain="example.com") is True


@pytest.mark.parametrize("canon", [(b"simple", b"simple"), (b"relaxed", b"relaxed")])
def test_signature_survives_postfix_relay(
    postfix_factory, rsa_key: tuple[bytes, bytes], canon: tuple[bytes, bytes]
) -> None:
    """End to end: what the sink stores is exactly what a receiver would verify."""
    pem, record = rsa_key
    signed = _sign(_message(TRICKY_BODY), pem, canon)
    pf = postfix_factory()
    got = _relay(pf, signed)
    assert dkimcheck.verify_all(got.data, {"sel._domainkey.example.com.": record}) == [True]
