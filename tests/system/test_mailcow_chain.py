"""Mailcow's milter chain, for real: Postfix → rspamd (Mailcow's rules) → dkim-sidecar → sink.

What happens to relay mail in a real Mailcow depends first on rspamd, which Mailcow puts in
front of every other milter. This module runs a real rspamd configured with Mailcow's rules
(tests/harness/rspamd.py), a real Postfix with Mailcow's milter settings and exactly the
``smtpd_milters`` line of config/postfix-extra.cf, the real sidecar, one real Redis that both
rspamd and the sidecar read (keys, domains and forwarding hosts seeded as Mailcow's UI stores
them) and a loopback DNS server with the domains' SPF, DMARC and DKIM records. Every message is
judged at the sink by dkimpy, and each signature is told apart by who made it: rspamd's scan
(its log line for the Message-ID says DKIM_SIGNED) and the sidecar's (the line it logged for
the message, and its counters).

The clients, all presented by XCLIENT over one loopback connection each:

- RELAY, a printer: in Postfix's mynetworks and the sidecar's relay_networks, not one of
  Mailcow's own networks, and (unless a test makes it one) not a forwarding host.
- MAILCOW_NET_CLIENT: an address in Mailcow's own Docker network, rspamd's local_addrs.

The domains: STRICT publishes ``v=spf1 -all`` and DMARC ``p=reject``; LENIENT ``~all`` and
``p=none``; LISTED lists the printers' network in its SPF record, with ``p=reject``. All are
Mailcow domains (DOMAIN_MAP) with a Mailcow DKIM key (selector "dkim").
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import pytest
import redis

from dkim_sidecar.dkim.keys import Algorithm, generate_key
from harness.dkimcheck import signature_domains, verify_results
from harness.dnsserver import TxtServer
from harness.paths import REPO
from harness.postfix import PostfixInstance, SendResult, postfix_available
from harness.redis import (
    RedisServer,
    mailcow_pub_b64,
    seed_domain,
    seed_forwarding_host,
    seed_mailcow,
)
from harness.rspamd import REJECT_MESSAGE, Rspamd, RspamdResult, rspamd_available
from harness.sidecar import Sidecar, wait_for
from harness.sink import SinkMessage, SmtpSink

ROOT = REPO

STRICT = "strict.example"  # v=spf1 -all, DMARC p=reject
LENIENT = "lenient.example"  # v=spf1 ~all, DMARC p=none
LISTED = "listed.example"  # v=spf1 ip4:<the printers' network> -all, DMARC p=reject
SELECTOR = "dkim"  # Mailcow's default selector
RCPT = "someone@elsewhere.test"  # not a Mailcow domain: relayed out, to the sink

RELAY = "192.0.2.10"  # a printer
RELAY_NETWORKS = ["192.0.2.0/28"]  # the sidecar's relay_networks
FORWARDING_HOST = RELAY_NETWORKS[0]  # the same network, typed into Mailcow's Forwarding hosts
REFRESH = 0.5  # the sidecar's key refresh: how soon it sees a forwarding host come or go
MAILCOW_NET = "172.22.1.0/24"  # Mailcow's default IPV4_NETWORK: rspamd's local_addrs
MAILCOW_NET_CLIENT = "172.22.1.7"
# Postfix's mynetworks in this Mailcow: its own network (Mailcow's default) plus the printers,
# as config/postfix-extra.cf tells the admin to write it.
MYNETWORKS = [MAILCOW_NET, *RELAY_NETWORKS]

# Mailcow's main.cf (data/conf/postfix/main.cf), the milter part.
MAILCOW_MILTER_MAIN_CF = {
    "milter_default_action": "tempfail",
    "milter_protocol": "6",
    "milter_mail_macros": "i {mail_addr} {client_addr} {client_name} {auth_authen}",
}

PASSWORD = secrets.token_urlsafe(32)


def mailcow_smtpd_milters(rspamd_milter: str, sidecar_milter: str) -> str:
    """The one active smtpd_milters line of config/postfix-extra.cf, with Mailcow's host names
    replaced by this test's loopback ports: the file and this test cannot drift apart."""
    text = (ROOT / "config" / "postfix-extra.cf").read_text()
    lines = [line for line in text.splitlines() if re.match(r"smtpd_milters\s*=", line)]
    assert len(lines) == 1, lines
    value = lines[0].split("=", 1)[1].strip()
    assert value.startswith("inet:rspamd:9900,"), "rspamd must stay first: " + value
    assert "{ inet:dkim-sidecar:8891," in value, value
    return value.replace("inet:rspamd:9900", rspamd_milter).replace(
        "inet:dkim-sidecar:8891", sidecar_milter
    )


@dataclass
class Chain:
    postfix: PostfixInstance
    sink: SmtpSink
    rspamd: Rspamd
    sidecar: Sidecar
    redis: redis.Redis
    dkim_dns: dict[str, str]  # key record name -> TXT, for dkimpy


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    if not postfix_available():
        pytest.skip("Postfix is not installed (/usr/sbin/postfix missing)")
    if not rspamd_available():
        pytest.skip("rspamd is not installed (/usr/bin/rspamd missing; `make test` installs it)")
    if os.geteuid() != 0:
        pytest.fail("this module must run as root (it starts a real Postfix master and rspamd)")
    keys = {d: generate_key(Algorithm.RSA_SHA256, 2048) for d in (STRICT, LENIENT, LISTED)}
    dkim_dns = {
        f"{SELECTOR}._domainkey.{d}": f"v=DKIM1; k=rsa; p={mailcow_pub_b64(pem)}"
        for d, pem in keys.items()
    }
    zone: dict[str, Any] = {
        STRICT: [[b"v=spf1 -all"]],
        f"_dmarc.{STRICT}": [[b"v=DMARC1; p=reject"]],
        LENIENT: [[b"v=spf1 ~all"]],
        f"_dmarc.{LENIENT}": [[b"v=DMARC1; p=none"]],
        LISTED: [[f"v=spf1 ip4:{RELAY_NETWORKS[0]} -all".encode()]],
        f"_dmarc.{LISTED}": [[b"v=DMARC1; p=reject"]],
        **{name: [[txt.encode()]] for name, txt in dkim_dns.items()},
    }
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(RedisServer(password=PASSWORD))
        client = server.client()
        for domain, pem in keys.items():
            seed_mailcow(client, domain, SELECTOR, pem, mailcow_pub_b64(pem))
            seed_domain(client, domain)
        dns = stack.enter_context(TxtServer(zone))
        rspamd = stack.enter_context(
            Rspamd(
                redis=(server.host, server.port, PASSWORD),
                nameserver=("127.0.0.1", dns.port),
                local_networks=[MAILCOW_NET],
            )
        )
        sidecar = Sidecar(
            tmp_path_factory.mktemp("sidecar"),
            {
                "relay_networks": RELAY_NETWORKS,
                "keys": {
                    "redis": {"host": "127.0.0.1", "port": server.port},
                    "refresh_interval": REFRESH,
                },
            },
            {"REDISPASS": PASSWORD},
        )
        stack.callback(sidecar.stop)
        sidecar.start()
        sink = stack.enter_context(SmtpSink())
        postfix = PostfixInstance(
            sink.port,
            mailcow_smtpd_milters(rspamd.milter, sidecar.postfix_milter),
            milter_default_action=MAILCOW_MILTER_MAIN_CF["milter_default_action"],
            extra_main_cf=MAILCOW_MILTER_MAIN_CF,
            extra_mynetworks=MYNETWORKS,
        )
        postfix.sink = sink
        stack.callback(postfix.cleanup)
        postfix.start()
        yield Chain(postfix, sink, rspamd, sidecar, client, dkim_dns)
        assert "Traceback" not in sidecar.log()


# -- one message through the chain -----------------------------------------------------------------


@dataclass
class Outcome:
    reply: SendResult
    scan: RspamdResult  # rspamd's verdict on this message
    delivered: SinkMessage | None
    sidecar_line: str | None  # the sidecar's log line for this message, if it wrote one
    sidecar_signed: float | None  # how many messages the sidecar signed meanwhile (None: down)

    @property
    def signatures(self) -> list[str]:
        return signature_domains(self.delivered.data) if self.delivered else []


def send(
    chain: Chain,
    domain: str,
    addr: str,
    login: str | None = None,
    *,
    expect_delivery: bool = True,
    expect_sidecar_line: bool = True,
    sidecar_up: bool = True,
) -> Outcome:
    """One message from `addr` (XCLIENT), From: and MAIL FROM in `domain`; returns what each
    party made of it. The sidecar's line is the one it wrote for this client meanwhile: its
    lines for messages it skips before the end of the header carry no queue ID."""
    mid = f"{secrets.token_hex(8)}@{domain}"
    message = (
        f"From: Printer <printer@{domain}>\r\n"
        f"To: <{RCPT}>\r\n"
        f"Subject: scan to mail\r\n"
        f"Date: {formatdate()}\r\n"
        f"Message-ID: <{mid}>\r\n"
        "\r\n"
        "Scanned document attached (not really).\r\n"
    ).encode()
    xclient = {"ADDR": addr}
    if login:
        xclient["LOGIN"] = login
    signed_before = _signed(chain.sidecar) if sidecar_up else None
    log_mark = len(chain.sidecar.log())
    reply = chain.postfix.send(f"printer@{domain}", RCPT, message, xclient=xclient)
    scan = chain.rspamd.result_for(mid)
    delivered = None
    if expect_delivery:
        assert reply.ok, (reply, chain.postfix.log_tail())
        wait_for(lambda: _find(chain.sink, mid) is not None, 60, f"<{mid}> at the sink")
        delivered = _find(chain.sink, mid)

    def line() -> str | None:
        new = chain.sidecar.log()[log_mark:].splitlines()
        return next((x for x in new if f" client={addr} " in x), None)

    if expect_sidecar_line and sidecar_up:
        wait_for(lambda: line() is not None, 60, f"the sidecar's log line for {addr}")
    signed = None if signed_before is None else _signed(chain.sidecar) - signed_before
    return Outcome(reply, scan, delivered, line(), signed)


def _signed(sidecar: Sidecar) -> float:
    return sidecar.metric("dkim_sidecar_messages_total", outcome="signed", reason="signed")


def _find(sink: SmtpSink, mid: str) -> SinkMessage | None:
    needle = f"<{mid}>".encode()
    return next((m for m in list(sink.messages) if needle in m.header_block), None)


def reason(line: str | None) -> str | None:
    m = re.search(r"reason=(\w+)", line or "")
    return m.group(1) if m else None


@contextlib.contextmanager
def forwarding_host(chain: Chain, host: str, *, keep_spam: bool) -> Iterator[None]:
    """The host is one of Mailcow's forwarding hosts for the duration (Redis, as the UI)."""
    seed_forwarding_host(chain.redis, host, keep_spam=keep_spam)
    try:
        yield
    finally:
        chain.redis.hdel("WHITELISTED_FWD_HOST", host)
        chain.redis.hdel("KEEP_SPAM", host)


def networks_rspamd_will_reject(chain: Chain, expected: float) -> float:
    """The sidecar's own count of its relay networks that no forwarding host covers, once it
    reads `expected` (after a key refresh)."""
    name = "dkim_sidecar_relay_networks_outside_forwarding_hosts"
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: chain.sidecar.metric(name) == expected, 60, name)
    return chain.sidecar.metric(name)


def assert_one_verified_signature(chain: Chain, out: Outcome, domain: str) -> None:
    assert out.delivered is not None
    assert out.signatures == [domain], out.delivered.header_block.decode(errors="replace")
    results = verify_results(out.delivered.data, chain.dkim_dns)
    assert [r.ok for r in results] == [True], results
    assert results[0].selector == SELECTOR


# -- a. a relay host that is only in mynetworks ----------------------------------------------------


@pytest.mark.parametrize("domain", [STRICT, LENIENT])
def test_relay_host_only_in_mynetworks_is_rejected_by_rspamd(chain: Chain, domain: str) -> None:
    """A printer that Postfix lets relay but that is not a forwarding host is, to Mailcow's
    rspamd, an outside client sending as a Mailcow domain: SPOOFED_UNAUTH (+50) rejects it.
    With p=reject the policy symbols alone (8 + 16) already pass the reject threshold of 15;
    with ~all and p=none (0.1 + 0.1) SPOOFED_UNAUTH is what rejects it."""
    # The sidecar knows in advance: its relay network is no forwarding host, and it says so.
    assert networks_rspamd_will_reject(chain, 1) == 1
    warning = f"relay network {FORWARDING_HOST} is not a Mailcow forwarding host"
    assert warning in chain.sidecar.log()
    out = send(chain, domain, RELAY, expect_delivery=False)
    assert (out.reply.stage, out.reply.code) == ("dot", 554), out.reply
    assert out.reply.message.decode().startswith("5.7.1 " + REJECT_MESSAGE), out.reply
    assert out.scan.action == "reject"
    # (the composite absorbs the MAILCOW_DOMAIN_HEADER_FROM it needs)
    assert out.scan.symbols["SPOOFED_UNAUTH"] == 50.0
    assert not out.scan.has("WHITELISTED_FWD_HOST")
    if domain == STRICT:
        assert out.scan.symbols["R_SPF_FAIL"] == 8.0
        assert out.scan.symbols["DMARC_POLICY_REJECT"] == 16.0
    else:
        assert out.scan.symbols["R_SPF_SOFTFAIL"] == 0.1
        assert out.scan.symbols["DMARC_POLICY_SOFTFAIL"] == 0.1
        assert out.scan.score - 50.0 < out.scan.required  # without SPOOFED_UNAUTH: delivered
    # Postfix told the sidecar that the message was dropped; nothing reached the sink.
    assert reason(out.sidecar_line) == "aborted", out.sidecar_line
    assert out.sidecar_signed == 0
    # Postfix answered 554 at the dot, so it queued nothing: no later delivery can come.
    assert not any(f"<{out.scan.message_id}>".encode() in m.data for m in chain.sink.attempts)


def test_relay_host_in_the_domains_spf_record_passes_rspamd(chain: Chain) -> None:
    """The other way past SPOOFED_UNAUTH: the From: domain's SPF record lists the relay host
    (an application server with a public address, say). SPF passes, DMARC passes by SPF
    alignment, no policy symbol scores positive: rspamd lets it through unsigned, without any
    forwarding host, and the sidecar signs it."""
    out = send(chain, LISTED, RELAY)
    assert out.scan.action == "no action", out.scan
    assert out.scan.symbols["R_SPF_ALLOW"] == -0.2
    assert out.scan.symbols["DMARC_POLICY_ALLOW"] == -0.5
    assert not out.scan.has("SPOOFED_UNAUTH") and not out.scan.has("DKIM_SIGNED")
    assert_one_verified_signature(chain, out, LISTED)
    assert reason(out.sidecar_line) == "signed", out.sidecar_line


# -- b. the same host, also a forwarding host ------------------------------------------------------


@pytest.mark.parametrize("spam_filter", ["on", "off"])
def test_relay_host_that_is_a_forwarding_host_is_signed_by_the_sidecar(
    chain: Chain, spam_filter: str
) -> None:
    """Mailcow > Forwarding hosts, with the spam filter on (WHITELISTED_FWD_HOST only) or off
    (KEEP_SPAM too): rspamd lets the printer's mail through and does not sign it; the sidecar
    signs it, once, with the From: domain's Mailcow key."""
    with forwarding_host(chain, FORWARDING_HOST, keep_spam=spam_filter == "off"):
        assert networks_rspamd_will_reject(chain, 0) == 0  # the sidecar's warning goes away
        out = send(chain, STRICT, RELAY)
    assert out.scan.action == "no action", out.scan
    assert not out.scan.has("SPOOFED_UNAUTH")
    assert not out.scan.has("DKIM_SIGNED")  # not rspamd's: it signs only auth and local mail
    if spam_filter == "on":
        assert out.scan.symbols["WHITELISTED_FWD_HOST"] == 0.0
        # WL_FWD_HOST took the failing SPF and DMARC results, and their scores, away
        assert not out.scan.has("R_SPF_FAIL") and not out.scan.has("DMARC_POLICY_REJECT")
    else:
        # KEEP_SPAM accepted it before any check ran
        assert out.scan.symbols == {}
        assert "from keep_spam" in chain.rspamd.read_log()
    assert_one_verified_signature(chain, out, STRICT)
    assert reason(out.sidecar_line) == "signed", out.sidecar_line
    assert out.sidecar_signed == 1


# -- c. an authenticated sender --------------------------------------------------------------------


def test_authenticated_sender_is_signed_by_rspamd_only(chain: Chain) -> None:
    """SMTP AUTH (here from the printer's address, which is in the sidecar's relay_networks):
    rspamd signs (sign_authenticated), the sidecar leaves it alone."""
    out = send(chain, STRICT, RELAY, login="printer")
    assert out.scan.user == "printer"
    assert out.scan.symbols["MAILCOW_AUTH"] == -20.0
    assert out.scan.has("DKIM_SIGNED")
    assert_one_verified_signature(chain, out, STRICT)
    assert reason(out.sidecar_line) == "authenticated", out.sidecar_line
    assert out.sidecar_signed == 0


# -- d. a client on Mailcow's own network ----------------------------------------------------------


def test_client_on_mailcows_own_network_is_signed_by_rspamd_only(chain: Chain) -> None:
    """rspamd's local_addrs (Mailcow's Docker network): rspamd signs (sign_local); the
    sidecar, whose relay_networks must never hold Mailcow's network, lets it go at connect."""
    let_go = chain.sidecar.metric(
        "dkim_sidecar_messages_total", outcome="skipped", reason="not_relay"
    )
    out = send(chain, STRICT, MAILCOW_NET_CLIENT, expect_sidecar_line=False)
    assert out.scan.ip == MAILCOW_NET_CLIENT
    assert out.scan.has("DKIM_SIGNED")
    assert not out.scan.has("R_SPF_FAIL")  # no SPF/DMARC checks for local clients
    assert_one_verified_signature(chain, out, STRICT)
    assert out.sidecar_line is None  # let go at connect: counted, not logged
    assert out.sidecar_signed == 0
    assert (
        chain.sidecar.metric("dkim_sidecar_messages_total", outcome="skipped", reason="not_relay")
        > let_go
    )


def test_mailcow_network_in_relay_networks_is_not_signed_twice(chain: Chain) -> None:
    """Should an admin list Mailcow's own network in relay_networks (docs/mailcow.md says
    never), its mail still leaves with one signature: rspamd signs it first (sign_local), and
    the sidecar, second in the chain, sees that DKIM-Signature of the From: domain."""
    config = copy.deepcopy(chain.sidecar.config)
    chain.sidecar.write_config({**config, "relay_networks": [*RELAY_NETWORKS, MAILCOW_NET]})
    chain.sidecar.reload()
    try:
        out = send(chain, STRICT, MAILCOW_NET_CLIENT)
    finally:
        chain.sidecar.write_config(config)
        chain.sidecar.reload()
    assert out.scan.has("DKIM_SIGNED")
    assert_one_verified_signature(chain, out, STRICT)
    assert reason(out.sidecar_line) == "already_signed", out.sidecar_line
    assert out.sidecar_signed == 0


# -- e. one milter stopped -------------------------------------------------------------------------


def test_sidecar_stopped_mail_still_flows_unsigned(chain: Chain) -> None:
    """config/postfix-extra.cf's default_action=accept: without the sidecar, Postfix passes
    the printer's mail on, unsigned, instead of Mailcow's global tempfail."""
    assert chain.sidecar.stop() == 0
    try:
        mark = chain.postfix.log_mark()
        with forwarding_host(chain, FORWARDING_HOST, keep_spam=False):
            out = send(chain, STRICT, RELAY, sidecar_up=False)
        assert out.reply.ok
        assert out.signatures == []
        assert f"connect to Milter service {chain.sidecar.postfix_milter}" in (
            chain.postfix.read_log(since=mark)
        )
    finally:
        chain.sidecar.start()
    # and signing resumes
    with forwarding_host(chain, FORWARDING_HOST, keep_spam=False):
        again = send(chain, STRICT, RELAY)
    assert_one_verified_signature(chain, again, STRICT)


def test_rspamd_stopped_all_mail_is_tempfailed(chain: Chain) -> None:
    """Mailcow's milter_default_action = tempfail applies to rspamd: while rspamd is down,
    Postfix asks every client to come back later (451 4.7.1 at MAIL FROM), relay,
    authenticated and Mailcow-internal mail alike, and queues nothing."""
    chain.rspamd.stop()
    try:
        replies = []
        for addr, login in [(RELAY, None), (RELAY, "printer"), (MAILCOW_NET_CLIENT, None)]:
            msg = f"From: <printer@{STRICT}>\r\nTo: <{RCPT}>\r\nSubject: x\r\n\r\nx\r\n".encode()
            xclient = {"ADDR": addr, **({"LOGIN": login} if login else {})}
            replies.append(chain.postfix.send(f"printer@{STRICT}", RCPT, msg, xclient=xclient))
        for r in replies:
            assert r.code == 451, r
            assert r.message.startswith(b"4.7.1 "), r
        assert chain.postfix.queue_files() == []
    finally:
        chain.rspamd.start()
    with forwarding_host(chain, FORWARDING_HOST, keep_spam=False):
        out = send(chain, STRICT, RELAY)
    assert_one_verified_signature(chain, out, STRICT)
