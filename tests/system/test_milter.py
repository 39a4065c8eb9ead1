"""The milter over the milter protocol, without Postfix: a real `dkim-sidecar run` process,
driven byte-exactly by our MTA-side client; every signature checked by dkimpy."""

from __future__ import annotations

import socket
import struct

import pytest

from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from harness.dkimcheck import verify_all as verify
from harness.sidecar import Sidecar, write_keys

RELAY_V4 = "192.0.2.10"
RELAY_V6 = "2001:db8:1::25"


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    made = {
        "rsa": SigningKey.load("example.com", "rsa", generate_key(Algorithm.RSA_SHA256, 2048)),
        "ed": SigningKey.load("example.com", "ed", generate_key(Algorithm.ED25519_SHA256)),
        "org": SigningKey.load("example.org", "s1", generate_key(Algorithm.RSA_SHA256, 1024)),
    }
    return made


def _pem(key: SigningKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def dns(keys: dict[str, SigningKey]) -> dict[bytes, bytes]:
    return {(k.dns_name + ".").encode(): k.dns_record().encode() for k in keys.values()}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]):
    work = tmp_path_factory.mktemp("sidecar")
    write_keys(work / "keys", [(k.domain, k.selector, _pem(k)) for k in keys.values()])
    s = Sidecar(
        work,
        {
            "relay_networks": ["192.0.2.0/24", "2001:db8:1::/48"],
            "keys": {"directory": str(work / "keys")},
        },
    )
    s.start()
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log()


def msg(
    frm: bytes = b"Alice <alice@example.com>", body: bytes = b"Hello\r\n", extra: bytes = b""
) -> bytes:
    return (
        b"From: " + frm + b"\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: a test\r\n"
        b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <t1@example.com>\r\n" + extra + b"\r\n" + body
    )


def test_relay_client_gets_dual_signature_that_verifies(sidecar: Sidecar, dns) -> None:
    r = sidecar.send(msg(body=b"Hello  world \r\n\r\n\r\n"), RELAY_V4)
    assert r.action == "accept" and r.stage == "eom"
    assert len(r.signatures) == 2
    assert r.message.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")  # RSA topmost
    assert b"a=ed25519-sha256" in r.signatures[1] or b"a=ed25519-sha256" in r.signatures[0]
    assert verify(r.message, dns) == [True, True]
    # and a change after signing breaks both
    tampered = r.message.replace(b"Hello  world", b"Hello  World")
    assert verify(tampered, dns) == [False, False]


@pytest.mark.parametrize(
    "client_ip",
    [
        "198.51.100.7",
        "192.0.3.1",
        "192.0.1.255",
        "2001:db8:2::1",
        "::ffff:198.51.100.7",
        "10.0.0.1",
    ],
)
def test_clients_outside_relay_networks_are_let_go_at_connect(sidecar: Sidecar, client_ip) -> None:
    r = sidecar.send(msg(), client_ip)
    assert (r.action, r.stage) == ("accept", "connect")
    assert not r.signatures


@pytest.mark.parametrize("client_ip", ["192.0.2.0", "192.0.2.255", RELAY_V6, "::ffff:192.0.2.77"])
def test_relay_edges_v6_and_mapped_addresses_are_signed(sidecar: Sidecar, dns, client_ip) -> None:
    r = sidecar.send(msg(), client_ip)
    assert len(r.signatures) == 2
    assert verify(r.message, dns) == [True, True]


def test_authenticated_sender_is_left_to_rspamd(sidecar: Sidecar) -> None:
    before = sidecar.metric(
        "dkim_sidecar_messages_total", outcome="skipped", reason="authenticated"
    )
    r = sidecar.send(msg(), RELAY_V4, auth="bob")
    # decided at MAIL, which has no reply (SMFIP_NR_MAIL): answered at DATA, before the header
    assert (r.action, r.stage) == ("accept", "data")
    after = sidecar.metric("dkim_sidecar_messages_total", outcome="skipped", reason="authenticated")
    assert after == before + 1


def test_existing_signature_of_same_domain_is_not_signed_again(sidecar: Sidecar, dns) -> None:
    signed = sidecar.send(msg(), RELAY_V4)
    assert verify(signed.message, dns) == [True, True]
    again = sidecar.send(signed.message, RELAY_V4)
    # decided at the end of the header (no reply there: SMFIP_NR_EOH), answered at the end
    assert (again.action, again.stage, again.signatures) == ("accept", "eom", [])
    assert verify(again.message, dns) == [True, True]  # the first two, untouched


def test_existing_signature_of_other_domain_does_not_count(sidecar: Sidecar, dns) -> None:
    foreign = sidecar.send(msg(frm=b"<carol@example.org>"), RELAY_V4)
    assert verify(foreign.message, dns) == [True]  # example.org: one RSA key
    # the same body, now From example.com, still carrying example.org's signature
    rewritten = foreign.message.replace(b"From: <carol@example.org>", b"From: <dave@example.com>")
    r = sidecar.send(rewritten, RELAY_V4)
    assert len(r.signatures) == 2
    # ours, then example.org's, which now fails (its From changed), as it should
    assert verify(r.message, dns) == [True, True, False]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"To: x@example.net\r\nSubject: no from\r\n\r\nbody\r\n", "no_from"),
        (msg(extra=b"From: Eve <eve@example.com>\r\n"), "multiple_from"),
        (msg(frm=b"undisclosed"), "bad_from"),
        (msg(frm=b"<a@example.com>, <b@example.net>"), "bad_from"),
        (msg(frm=b"<someone@unknown.example>"), "no_key"),
    ],
)
def test_unsignable_messages_pass_unchanged_with_their_reason(
    sidecar: Sidecar, message, reason
) -> None:
    before = sidecar.metric("dkim_sidecar_messages_total", outcome="skipped", reason=reason)
    r = sidecar.send(message, RELAY_V4)
    # decided at the end of the header (SMFIP_NR_EOH): answered at the end of the message
    assert (r.action, r.stage, r.signatures) == ("accept", "eom", [])
    assert (
        sidecar.metric("dkim_sidecar_messages_total", outcome="skipped", reason=reason)
        == before + 1
    )


def test_from_with_comments_quotes_and_idn_is_signed(sidecar: Sidecar, dns) -> None:
    for frm in (
        b'"Smith, John (Sales)" <"john..smith@x"@example.com> (work)',
        b"alice@EXAMPLE.com",
        b"=?utf-8?q?J=C3=B6rg?= <joerg@example.com>",
    ):
        r = sidecar.send(msg(frm=frm), RELAY_V4)
        assert verify(r.message, dns) == [True, True], frm


def test_several_messages_abort_and_reuse_on_one_connection(sidecar: Sidecar, dns) -> None:
    with sidecar.client() as c:
        assert c.connect(RELAY_V4) == "continue"
        first = c.send_message(msg())
        assert verify(first.message, dns) == [True, True]
        # a message abandoned mid-body (RSET): the next one must not inherit any state
        assert c.mail(b"a@example.com") == "continue"
        c.header(b"From", b" <a@example.com>")
        assert c.eoh() == "continue"
        assert c.body(b"half a body") == "continue"
        c.abort()
        skipped = c.send_message(msg(frm=b"<x@unknown.example>"))
        assert (skipped.action, skipped.stage, skipped.signatures) == ("accept", "eom", [])
        third = c.send_message(msg(body=b"third\r\n"))
        assert verify(third.message, dns) == [True, True]


def test_dropped_connection_mid_body_leaves_the_milter_serving(sidecar: Sidecar, dns) -> None:
    for stage in ("header", "body"):
        c = sidecar.client()
        c.connect(RELAY_V4)
        c.mail(b"a@example.com")
        c.header(b"From", b" <a@example.com>")
        if stage == "body":
            c.eoh()
            c.body(b"x" * 1000)
        # the MTA goes away without a word
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    r = sidecar.send(msg(), RELAY_V4)
    assert verify(r.message, dns) == [True, True]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000, 65535])
def test_body_chunkings_and_bare_lf_sign_the_crlf_message(sidecar: Sidecar, dns, chunk) -> None:
    body = b"line one  \r\n\tTabbed\r\n\r\n" + b"a" * 70 + b"\r\n\r\n\r\n"
    with sidecar.client() as c:
        c.connect(RELAY_V4)
        r = c.send_message(msg(body=body), chunk=chunk)
    assert verify(r.message, dns) == [True, True]


def test_bare_lf_body_is_signed_as_the_crlf_the_receiver_sees(sidecar: Sidecar, dns) -> None:
    body_lf = b"one\ntwo  \n\nthree\n"
    with sidecar.client() as c:
        c.connect(RELAY_V4)
        r = c.send_message(msg(body=body_lf))
    crlf = r.message.replace(body_lf, body_lf.replace(b"\n", b"\r\n"))
    assert verify(crlf, dns) == [True, True]


def test_large_body_streams_and_verifies(sidecar: Sidecar, dns) -> None:
    line = b"VGhpcyBpcyBhIGJhc2U2NCBsaW5lIG9mIHNpeHR5LXNldmVuIGNoYXJhY3RlcnMgLi4uLi4u\r\n"
    body = line * (20 * 1024 * 1024 // len(line))
    r = sidecar.send(msg(body=body), RELAY_V4)
    assert verify(r.message, dns) == [True, True]


def test_line_over_998_octets_is_passed_unsigned_by_default(sidecar: Sidecar, dns) -> None:
    before = sidecar.metric("dkim_sidecar_messages_total", outcome="skipped", reason="long_lines")
    r = sidecar.send(msg(body=b"short\r\n" + b"x" * 999 + b"\r\nend\r\n"), RELAY_V4)
    # body packets get no reply (SMFIP_NR_BODY): the decision is answered at end of message
    assert (r.action, r.stage, r.signatures) == ("accept", "eom", [])
    assert sidecar.metric(
        "dkim_sidecar_messages_total", outcome="skipped", reason="long_lines"
    ) == (before + 1)
    ok = sidecar.send(msg(body=b"short\r\n" + b"x" * 998 + b"\r\nend\r\n"), RELAY_V4)
    assert verify(ok.message, dns) == [True, True]  # exactly 998 is allowed (RFC 5322 §2.1.1)


def test_too_many_headers_pass_unsigned(sidecar: Sidecar, dns) -> None:
    """limits.max_headers (1000 by default) fields are signed; one more is not."""

    def with_fields(n: int) -> bytes:
        return msg(extra=b"".join(b"X-Filler-%d: v\r\n" % i for i in range(n - 5)))  # msg(): 5

    def counted() -> float:
        return sidecar.metric(
            "dkim_sidecar_messages_total", outcome="skipped", reason="header_limit"
        )

    before = counted()
    r = sidecar.send(with_fields(1001), RELAY_V4)
    # header fields get no reply (SMFIP_NR_HDR): the decision is answered at end of message
    assert (r.action, r.stage, r.signatures) == ("accept", "eom", [])
    assert counted() == before + 1
    assert verify(sidecar.send(with_fields(1000), RELAY_V4).message, dns) == [True, True]


def test_folded_and_8bit_headers_verify(sidecar: Sidecar, dns) -> None:
    extra = b"Subject: caf\xc3\xa9 au lait,\r\n\tfolded  twice\r\n   and thrice\r\n"
    m = msg(extra=b"Cc: Zo\xc3\xab <zoe@example.net>,\r\n  Yan <yan@example.net>\r\n")
    m = m.replace(b"Subject: a test\r\n", extra)
    r = sidecar.send(m, RELAY_V4)
    assert verify(r.message, dns) == [True, True]
    assert b"\r\n\tfolded  twice\r\n   and thrice\r\n" in r.message


def test_independent_milter_client_gets_a_verifying_signature(sidecar: Sidecar, dns) -> None:
    """The PyPI package miltertest as the MTA, not our own client."""
    import miltertest

    sock = socket.create_connection(("127.0.0.1", sidecar.port), timeout=30)
    conn = miltertest.MilterConnection(sock)
    C = miltertest.constants
    # miltertest cannot parse macro lists in the negotiation reply: offer no SETSYMLIST, which
    # also covers an MTA that lacks it
    conn.optneg_mta(actions=C.SMFI_V6_ACTS & ~0x100)
    conn.send_ar(C.SMFIC_CONNECT, hostname="relay", family="4", port=4000, address=RELAY_V4)
    conn.send_macro(C.SMFIC_MAIL, i="Q1")
    conn._send(C.SMFIC_MAIL, args=["<a@example.com>"])  # no reply: SMFIP_NR_MAIL
    headers = [("From", " <a@example.com>"), ("To", " <b@example.net>"), ("Subject", " hi")]
    for name, value in headers:
        conn._send(C.SMFIC_HEADER, name=name, value=value)  # no reply: SMFIP_NR_HDR
    conn._send(C.SMFIC_EOH)  # no reply: SMFIP_NR_EOH
    conn._send(C.SMFIC_BODY, buf="Hello there.\r\n")  # no reply: SMFIP_NR_BODY
    replies = conn.send_eom()
    sock.close()
    inserted = [r for r in replies if r[0] == C.SMFIR_INSHEADER]
    assert replies[-1][0] == C.SMFIR_ACCEPT and len(inserted) == 2
    top = b"".join(
        b"DKIM-Signature:" + r[1]["value"].encode().replace(b"\n", b"\r\n") + b"\r\n"
        for r in reversed(inserted)
    )
    message = top + b"".join(f"{n}:{v}\r\n".encode() for n, v in headers) + b"\r\nHello there.\r\n"
    assert verify(message, dns) == [True, True]


def test_milter_negotiates_what_it_needs(sidecar: Sidecar) -> None:
    from dkim_sidecar.milter import client as m
    from dkim_sidecar.milter import codec as protocol

    with sidecar.client() as c:
        assert c.protocol & m.P_HDR_LEADSPC  # exact header bytes
        assert c.protocol & m.P_NR_HDR  # no reply per header
        assert c.protocol & m.P_NOHELO and c.protocol & m.P_NORCPT
        assert not c.protocol & m.P_NODATA  # the DATA step is answered (docs/design.md)
        assert not c.protocol & m.P_NR_DATA and not c.protocol & m.P_NR_CONN
        # no round trip where no decision is due (docs/design.md): MAIL, end of header, body
        for flag in (m.P_NR_MAIL, m.P_NR_EOH, m.P_NR_BODY):
            assert c.protocol & flag
        assert c.macros.get("M") == ["{auth_authen}"]
        assert c.macros.get("E") == ["i"]  # end of message
        assert c.macros.get("N") == ["i"]  # end of header (SMFIM_EOH is 6, SMFIM_DATA 4)
        assert set(c.macros) == {"M", "N", "E"}
        # header insertion must be asked for: an MTA refuses changes it did not agree to
        assert c.actions == protocol.F_ADDHDRS | protocol.F_SETSYMLIST


def test_log_line_per_message_names_queue_id_and_reason(sidecar: Sidecar) -> None:
    with sidecar.client() as c:
        c.connect(RELAY_V4)
        c.send_message(msg(), queue_id="QID12345")
    sidecar.wait_log("queue_id=QID12345")
    line = next(ln for ln in sidecar.log().splitlines() if "queue_id=QID12345" in ln)
    assert "reason=signed" in line and "domain=example.com" in line and "selectors=rsa,ed" in line


def test_no_private_key_material_in_log_or_metrics(sidecar: Sidecar, keys) -> None:
    text = sidecar.log() + sidecar.http("/metrics")[1]
    for key in keys.values():
        for line in _pem(key).splitlines()[1:-1]:
            assert line.decode() not in text


@pytest.mark.parametrize(
    "withheld",
    [
        pytest.param(0x80 | 0x80000, id="no NR_HDR, no NR_BODY"),
        pytest.param(0x2 | 0x8 | 0x100, id="sends HELO, RCPT and unknown commands"),
    ],
)
def test_mta_offering_fewer_options_gets_every_reply_it_waits_for(
    sidecar: Sidecar, dns, withheld: int
) -> None:
    """An MTA that cannot leave out replies or events (an older Postfix, Sendmail) waits for
    an answer to each of them: every one comes, in order, and the signature still verifies.
    A reply too many or too few would shift every later answer by one."""
    from dkim_sidecar.milter import client as m

    with m.MilterClient(sidecar.milter, timeout=30) as c:
        c.negotiate(protocol=m.ALL_PROTOCOL & ~withheld)
        assert not c.protocol & withheld
        assert c.connect(RELAY_V4) == "continue"
        assert c.helo() == "continue"
        for _ in range(2):  # two messages on one connection: nothing left over between them
            c._send(b"U", b"NOOP\0")  # before a message: a doubled reply would shift it
            assert c._reply() == "continue"
            r = c.send_message(msg(body=b"line\r\n" * 20000), rcpts=[b"a@example.net", b"b@x"])
            assert verify(r.message, dns) == [True, True]
