"""The signing-oracle guarantee (README, security model), from every angle, against the real
sidecar process.

Only a client inside the relay networks, by the address the MTA reports at connect, gets a
signature: never by a header, never by a macro, never by a hostname, never across a reload that
took its network away. Where the milter answers "accept" at connect, each test then behaves as
a broken MTA would and pushes the whole message anyway: it must still not be signed.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_robustness import dns_of, msg, pem, tag, verify

from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from dkim_sidecar.milter import client as mtaclient
from dkim_sidecar.milter.client import MilterClient, ProtocolError, Result
from harness.sidecar import Sidecar, wait_for, write_keys
from harness.threads import run_threads

RELAY_NETWORKS = ["192.0.2.0/25", "2001:db8:1::/64", "::ffff:203.0.113.0/120"]
RELAY = "192.0.2.10"
OUTSIDE = "198.51.100.7"
MESSAGES = "dkim_sidecar_messages_total"


@pytest.fixture(scope="module")
def keys() -> list[SigningKey]:
    return [SigningKey.load("example.com", "s1", generate_key(Algorithm.RSA_SHA256, 1024))]


@pytest.fixture(scope="module")
def dns(keys: list[SigningKey]) -> dict[bytes, bytes]:
    return dns_of(keys)


def _start(work: Path, keys: list[SigningKey], **config: Any) -> Sidecar:
    write_keys(work / "keys", [(k.domain, k.selector, pem(k)) for k in keys])
    settings = {
        "relay_networks": RELAY_NETWORKS,
        "keys": {"directory": str(work / "keys")},
        **config,
    }
    return Sidecar(work, settings).start()


def _finish(s: Sidecar) -> None:
    assert s.metric(MESSAGES, outcome="error", reason="error") == 0
    assert s.stop() == 0
    assert "Traceback" not in s.log()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, keys: list[SigningKey]):
    s = _start(tmp_path_factory.mktemp("oracle"), keys)
    yield s
    _finish(s)


def connect_frame(family: bytes, address: bytes = b"", host: bytes = b"client.example") -> bytes:
    """The SMFIC_CONNECT data as an MTA sends it (family U: no port, no address)."""
    if family == b"U":
        return host + b"\0U"
    return host + b"\0" + family + struct.pack("!H", 25) + address + b"\0"


def raw_connect(c: MilterClient, data: bytes) -> str:
    c._send(b"C", data)
    return c._reply()


def push_anyway(c: MilterClient, message: bytes) -> tuple[list[tuple[str, str]], Result]:
    """What a broken MTA would do after an accept at connect: send the whole message anyway,
    every step to the end of message whatever the replies say (waiting only for the replies
    the negotiated protocol promises). The replies by stage, and the end-of-message result."""
    queue = {"i": "4ABCDEF"}
    replies = [("mail", c.mail(b"scanner@example.com", queue)), ("rcpt", c.rcpt(b"a@example.net"))]
    replies.append(("data", c.data()))
    fields, body = mtaclient.split_header(message)
    replies += [("header", c.header(name, value)) for name, value in fields]
    replies.append(("eoh", c.eoh(queue)))
    replies.append(("body", c.body(body)))
    _, result = c.eom(queue)
    return replies, result


def assert_pushed_unsigned(c: MilterClient, message: bytes | None = None) -> None:
    """After an accept, a broken MTA pushes the whole message anyway: each step is let go
    again (the client is still not ours) and the end of message is answered unchanged."""
    replies, r = push_anyway(c, message or msg())
    assert {reply for _, reply in replies} <= {"continue", "accept"}, replies
    assert (r.action, r.stage, r.inserted, r.added) == ("accept", "eom", [], []), r


def assert_let_go(r: Result) -> None:
    """What an MTA that keeps the protocol sees: let go at DATA (MAIL has no reply), so it
    sends nothing more of the message, and nothing was inserted."""
    assert (r.action, r.stage, r.inserted, r.added) == ("accept", "data", [], []), r


def assert_never_signed(
    sidecar: Sidecar, connect: Any, message: bytes | None = None, *, may_refuse: bool = False
) -> None:
    """The milter lets the client go at connect and never signs, however far the MTA pushes.
    Only a connect the milter cannot read (may_refuse) may instead end the connection."""
    with sidecar.client() as c:
        try:
            first = connect(c)
        except ProtocolError:
            assert may_refuse, "the milter dropped a well-formed connect"
            return  # the milter dropped the connection: nothing can be signed on it
        assert first == "accept"
        assert_pushed_unsigned(c, message)


# --- clients outside the relay networks --------------------------------------------------------


@pytest.mark.parametrize(
    "client_ip",
    [
        OUTSIDE,
        "192.0.2.128",  # just above 192.0.2.0/25
        "192.0.1.255",  # just below
        "203.0.112.255",  # around ::ffff:203.0.113.0/120 (= 203.0.113.0/24 as IPv4)
        "203.0.114.0",
        "0.0.0.0",
        "255.255.255.255",
        "127.0.0.1",  # loopback is not in this config's relay networks
        "10.0.0.1",
        "169.254.0.1",  # IPv4 link-local
        "::",
        "::1",
        "fe80::1",  # IPv6 link-local
        "2001:db8:0:ffff:ffff:ffff:ffff:ffff",  # just below 2001:db8:1::/64
        "2001:db8:1:1::",  # just above
        "::ffff:198.51.100.7",  # IPv4-mapped, outside
        "::ffff:192.0.2.128",  # IPv4-mapped, just outside
        "::192.0.2.10",  # IPv4-compatible (deprecated): not the IPv4 address
        "::ffff:0:192.0.2.10",  # IPv4-translated (SIIT): not the IPv4 address
        "64:ff9b::c000:20a",  # NAT64 of 192.0.2.10
        "2002:c000:20a::1",  # 6to4 of 192.0.2.10
        "fe80::192.0.2.10",
    ],
)
def test_outside_clients_never_get_a_signature(sidecar: Sidecar, client_ip: str) -> None:
    assert_never_signed(sidecar, lambda c: c.connect(client_ip, hostname="relay.example.com"))


@pytest.mark.parametrize(
    "client_ip",
    [
        "192.0.2.0",
        "192.0.2.127",
        "2001:db8:1::",
        "2001:db8:1:0:ffff:ffff:ffff:ffff",
        "::ffff:192.0.2.127",
        "203.0.113.0",
        "203.0.113.255",
        "::ffff:203.0.113.9",
    ],
)
def test_the_edges_inside_are_signed(sidecar: Sidecar, dns, client_ip: str) -> None:
    """The other side of each edge above: the networks are exactly as wide as configured."""
    r = sidecar.send(msg(), client_ip)
    assert verify(r.message, dns) == [True]


@pytest.mark.parametrize(
    ("label", "data"),
    [
        ("unknown family", connect_frame(b"U")),
        ("unix socket", connect_frame(b"L", b"/var/spool/postfix/public/pickup")),
        ("unix, relay-looking path", connect_frame(b"L", RELAY.encode())),
        ("unknown family, relay hostname", connect_frame(b"U", host=RELAY.encode())),
    ],
)
def test_connects_without_an_ip_address_are_not_signed(sidecar: Sidecar, label, data) -> None:
    assert_never_signed(sidecar, lambda c: raw_connect(c, data))


@pytest.mark.parametrize(
    "data",
    [
        connect_frame(b"6", RELAY.encode()),  # an IPv4 text where IPv6 is announced
        connect_frame(b"4", b"::ffff:192.0.2.10"),
        connect_frame(b"4", b"192.0.2.10.evil.example"),
        connect_frame(b"6", b"fe80::1%eth0"),
        connect_frame(b"X", RELAY.encode()),  # no such family
        b"client.example",  # no family at all
    ],
)
def test_malformed_connects_are_refused_or_let_go(sidecar: Sidecar, dns, data: bytes) -> None:
    assert_never_signed(sidecar, lambda c: raw_connect(c, data), may_refuse=True)
    r = sidecar.send(msg(), RELAY)
    assert verify(r.message, dns) == [True]


def test_hostname_plays_no_part(sidecar: Sidecar, dns) -> None:
    """Only the address decides: an undecodable or relay-looking hostname changes nothing."""
    outside = connect_frame(b"4", OUTSIDE.encode(), host=RELAY.encode())
    assert_never_signed(sidecar, lambda c: raw_connect(c, outside))
    frame = connect_frame(b"4", RELAY.encode(), host=b"\xff\xfe.example")
    with sidecar.client() as c:
        assert raw_connect(c, frame) == "continue"
        r = c.send_message(msg())
    assert verify(r.message, dns) == [True]


# --- claims of an internal origin --------------------------------------------------------------

FORGED = (
    b"Received: from relay.example.com (relay.example.com [192.0.2.10])\r\n"
    b"\tby mail.example.com (Postfix) with ESMTPSA id 4ABC; Sat, 28 Nov 2026 10:00:00 +0000\r\n"
    b"X-Forwarded-For: 192.0.2.10\r\n"
    b"X-Originating-IP: [192.0.2.10]\r\n"
    b"X-Real-IP: 192.0.2.10\r\n"
    b"X-Client-IP: 2001:db8:1::25\r\n"
    b"Authentication-Results: mail.example.com; auth=pass smtp.auth=alice@example.com\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1; bh=x; b=y\r\n"
)


@pytest.mark.parametrize("client_ip", [OUTSIDE, "::ffff:198.51.100.7", "2001:db8:2::25"])
def test_forged_headers_claiming_internal_origin_do_not_count(sidecar: Sidecar, client_ip) -> None:
    assert_never_signed(sidecar, lambda c: c.connect(client_ip), msg(extra=FORGED))


def test_macros_claiming_a_relay_address_do_not_count(sidecar: Sidecar, dns) -> None:
    relay_macros = {
        "{client_addr}": RELAY,
        "{client_name}": "relay.example.com",
        "{client_ptr}": "relay.example.com",
        "{daemon_name}": "submission",
    }

    def connect(c: MilterClient) -> str:
        c.macro("C", relay_macros)
        return c.connect(OUTSIDE, hostname="relay.example.com")

    with sidecar.client() as c:
        assert connect(c) == "accept"
        assert_pushed_unsigned(c)  # a broken MTA goes on
    with sidecar.client() as c:
        c.macro("C", relay_macros)
        assert c.connect(OUTSIDE) == "accept"
        # ... with MAIL macros that claim a relay client and a login
        c.macro("M", {"{client_addr}": RELAY, "{auth_authen}": "alice"})
        assert_pushed_unsigned(c)
    # and the other way round: macros saying "outside" do not stop a relay client
    with sidecar.client() as c:
        c.macro("C", {"{client_addr}": OUTSIDE})
        assert c.connect(RELAY) == "continue"
        r = c.send_message(msg())
    assert verify(r.message, dns) == [True]


# --- the latest connect counts -----------------------------------------------------------------


def test_negotiation_makes_the_mta_wait_for_the_connect_answer(sidecar: Sidecar) -> None:
    """The decision at connect only holds if the MTA waits for it: no SMFIP_NR_CONN, and the
    connect event is not skipped (SMFIP_NOCONNECT)."""
    with sidecar.client() as c:
        assert not c.protocol & mtaclient.P_NR_CONN
        assert not c.protocol & mtaclient.P_NOCONNECT
        assert not c.protocol & mtaclient.P_NOMAIL  # the relay check again at MAIL


def test_new_client_after_xclient_relay_then_outside(sidecar: Sidecar, dns) -> None:
    """After XCLIENT, Postfix closes its milter connection (SMFIC_QUIT; milter8.c,
    LIBMILTER_AUTO_DISCONNECT) and opens a new one for the new connect event."""
    with sidecar.client() as c:
        assert c.connect(RELAY) == "continue"
        first = c.send_message(msg())
        c.quit()
    assert verify(first.message, dns) == [True]
    assert_never_signed(sidecar, lambda c: c.connect(OUTSIDE))


def test_new_client_after_xclient_outside_then_relay(sidecar: Sidecar, dns) -> None:
    with sidecar.client() as c:
        assert c.connect(OUTSIDE) == "accept"
        c.quit()
    r = sidecar.send(msg(), RELAY)
    assert verify(r.message, dns) == [True]


@pytest.mark.parametrize(("first", "second"), [(RELAY, OUTSIDE), (OUTSIDE, RELAY)])
def test_second_connect_on_the_same_milter_connection(sidecar: Sidecar, dns, first, second):
    """Postfix reconnects for each SMTP session (and after XCLIENT); an MTA that sends a
    second SMFIC_CONNECT on one connection gets it answered for the new client, and only the
    new client decides: nothing of the first one carries over."""
    with sidecar.client() as c:
        assert c.connect(first) == ("continue" if first == RELAY else "accept")
        assert c.connect(second) == ("continue" if second == RELAY else "accept")
        if second == RELAY:
            assert verify(c.send_message(msg()).message, dns) == [True]
        else:
            assert_pushed_unsigned(c)


def test_a_decision_held_for_one_client_does_not_answer_the_next_connect(sidecar, dns):
    """MAIL has no reply, so an outside client's not_relay decision waits for the next
    answer; a second connect on the connection starts over and must not get it."""
    with sidecar.client() as c:
        assert c.connect(OUTSIDE) == "accept"
        assert c.mail(b"a@example.com") == "continue"  # no reply: the decision is held
        assert c.connect(RELAY) == "continue"
        r = c.send_message(msg())
    assert verify(r.message, dns) == [True]


# --- reloads that take a network away ----------------------------------------------------------


@pytest.fixture(scope="module")
def reloading(tmp_path_factory: pytest.TempPathFactory, keys: list[SigningKey]):
    s = _start(tmp_path_factory.mktemp("reloading"), keys)
    yield s
    _finish(s)


def _relay_networks(s: Sidecar, networks: list[str]) -> None:
    s.write_config({**s.config, "relay_networks": networks})
    s.reload()


def test_reload_shrinking_relay_networks_applies_at_the_next_mail(reloading: Sidecar, dns):
    s = reloading
    not_relay = s.metric(MESSAGES, outcome="skipped", reason="not_relay")
    try:
        with s.client() as c:
            assert c.connect(RELAY) == "continue"
            first = c.send_message(msg(body=b"before the reload\r\n"))
            assert verify(first.message, dns) == [True]
            _relay_networks(s, ["198.51.100.0/24"])  # 192.0.2.0/25 is gone
            assert_let_go(c.send_message(msg(body=b"after the reload\r\n"), queue_id="AFTER1"))
            assert_let_go(c.send_message(msg(body=b"and the next\r\n")))
        assert s.metric(MESSAGES, outcome="skipped", reason="not_relay") == not_relay + 2
        assert_never_signed(s, lambda c: c.connect(RELAY))
        # IPv6 and mapped clients lose their networks the same way
        assert_never_signed(s, lambda c: c.connect("2001:db8:1::25"))
        assert_never_signed(s, lambda c: c.connect("::ffff:192.0.2.10"))
    finally:
        _relay_networks(s, RELAY_NETWORKS)
    r = s.send(msg(), RELAY)
    assert verify(r.message, dns) == [True]


def test_reload_to_an_empty_relay_list_signs_nothing(reloading: Sidecar, dns) -> None:
    s = reloading
    try:
        with s.client() as c:
            assert c.connect(RELAY) == "continue"
            _relay_networks(s, [])
            assert_let_go(c.send_message(msg()))
        for ip in (RELAY, "2001:db8:1::1", "127.0.0.1", "::1"):
            assert_never_signed(s, lambda c, ip=ip: c.connect(ip))
    finally:
        _relay_networks(s, RELAY_NETWORKS)


def test_message_in_progress_keeps_the_snapshot_it_started_with(reloading: Sidecar, dns):
    """By design (runtime.py): a message reads the snapshot once, at MAIL, and keeps it to its
    end; a reload never reaches back into it. The client was ours when the message began."""
    s = reloading
    try:
        with s.client() as c:
            assert c.connect(RELAY) == "continue"
            assert c.mail(b"a@example.com", {"i": "INFLIGHT"}) == "continue"
            _relay_networks(s, ["198.51.100.0/24"])
            for name, value in [(b"From", b" <a@example.com>"), (b"Subject", b" x")]:
                c.header(name, value)
            assert c.eoh() == "continue"
            assert c.body(b"body\r\n") == "continue"
            _, result = c.eom()
        assert len(result.signatures) == 1
        signed = (
            b"DKIM-Signature:" + result.signatures[0].replace(b"\n", b"\r\n") + b"\r\n"
            b"From: <a@example.com>\r\nSubject: x\r\n\r\nbody\r\n"
        )
        assert verify(signed, dns) == [True]
    finally:
        _relay_networks(s, RELAY_NETWORKS)


# --- SIGHUP storm ------------------------------------------------------------------------------


def test_sighup_storm_during_traffic(tmp_path: Path) -> None:
    """20 SIGHUPs while 4 threads send, the config flipping between two whole setups (key set,
    selector, canonicalization, expiry). Every message is signed by exactly one of them, whole:
    s=a always with relaxed/relaxed and no x=, s=b always with simple/simple and x=."""
    key_a = SigningKey.load("example.com", "a", generate_key(Algorithm.RSA_SHA256, 1024))
    key_b = SigningKey.load("example.com", "b", generate_key(Algorithm.RSA_SHA256, 1024))
    dns = dns_of([key_a, key_b])
    write_keys(tmp_path / "keys-a", [("example.com", "a", pem(key_a))])
    write_keys(tmp_path / "keys-b", [("example.com", "b", pem(key_b))])
    base = {"relay_networks": RELAY_NETWORKS}
    setups = [
        {**base, "keys": {"directory": str(tmp_path / "keys-a")}},
        {
            **base,
            "keys": {"directory": str(tmp_path / "keys-b")},
            "canonicalization": "simple/simple",
            "expire_after": 3600,
        },
    ]
    s = Sidecar(tmp_path / "run", setups[0]).start()
    full = [{**s.config, **setup} for setup in setups]  # listen and metrics as the harness set

    def switch(i: int) -> None:
        """Atomically, as a careful admin (or a ConfigMap) would: never a half-written file."""
        tmp = s.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(full[i % 2]))
        os.replace(tmp, s.config_path)

    stop = threading.Event()
    results: list[Result] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                with s.client() as c:
                    assert c.connect(RELAY) == "continue"
                    for _ in range(5):
                        body = b"thread %d message %d\r\n" % (n, i)
                        r = c.send_message(msg(body=body), queue_id=f"T{n}x{i}")
                        i += 1
                        with lock:
                            results.append(r)
        except BaseException as exc:  # carried to the test
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(results) > 50, 60, "traffic")
        reloads = 0.0
        for i in range(1, 21):
            switch(i)
            s.signal(signal.SIGHUP)
            if i % 5:
                time.sleep(0.06 if i % 3 else 0.01)  # bursts: some coalesce in one reload
                continue
            # Every fifth signal, wait (however slow the machine) until a reload has run and the
            # setup just written signs under traffic: both setups are then seen, whatever the
            # bursts coalesced into.
            wait_for(lambda n=reloads: _reloads(s) > n, 60, "a reload")
            reloads = _reloads(s)
            mark, want = len(results), (b"b" if i % 2 else b"a")
            wait_for(
                lambda mark=mark, want=want: want in _selectors(results[mark:]),
                60,
                f"a message with s={want.decode()}",
            )
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[0]
        assert _reloads(s) >= 4
        assert s.metric("dkim_sidecar_config_reloads_total", result="failed") == 0
        assert s.metric(MESSAGES, outcome="error", reason="error") == 0
        seen = {b"a": 0, b"b": 0}
        for r in results:
            assert (r.action, r.stage) == ("accept", "eom") and len(r.signatures) == 1
            sig = r.signatures[0]
            selector = tag(sig, b"s")
            seen[selector] += 1
            if selector == b"a":
                assert tag(sig, b"c") == b"relaxed/relaxed" and b"x=" not in sig
            else:
                assert tag(sig, b"c") == b"simple/simple"
                assert int(tag(sig, b"x")) - int(tag(sig, b"t")) == 3600
            assert verify(r.message, dns) == [True]
        assert seen[b"a"] and seen[b"b"], seen
        assert s.metric(MESSAGES, outcome="signed", reason="signed") == len(results)
        print(
            f"\nSIGHUP storm: {len(results)} messages ({seen[b'a']} s=a, {seen[b'b']} s=b), "
            f"{s.metric('dkim_sidecar_config_reloads_total', result='ok'):.0f} reloads"
        )
    finally:
        stop.set()
        _finish(s)


def _reloads(s: Sidecar) -> float:
    return s.metric("dkim_sidecar_config_reloads_total", result="ok")


def _selectors(results: list[Result]) -> set[bytes]:
    return {tag(r.signatures[0], b"s") for r in results if r.signatures}


def test_sighup_storm_mid_connection_follows_each_message_snapshot(tmp_path: Path) -> None:
    """One connection, a reload between its messages: each message takes the snapshot current
    at its MAIL, the connect-time decision is checked again, nothing leaks between them."""
    key = SigningKey.load("example.com", "s1", generate_key(Algorithm.RSA_SHA256, 1024))
    dns = dns_of([key])
    s = _start(tmp_path, [key])
    try:
        with s.client() as c:
            assert c.connect(RELAY) == "continue"
            for i in range(6):
                networks = RELAY_NETWORKS if i % 2 == 0 else ["198.51.100.0/24"]
                _relay_networks(s, networks)
                r = c.send_message(msg(body=b"%d\r\n" % i))
                if i % 2 == 0:
                    assert verify(r.message, dns) == [True]
                else:
                    assert_let_go(r)
    finally:
        _finish(s)


def test_no_signature_reaches_an_outside_client_under_load(sidecar: Sidecar, dns) -> None:
    """Interleaved relay and outside connections from many threads: the decision of one never
    leaks into another (each connection has its own session)."""
    results: dict[str, int] = {"relay": 0, "outside": 0}
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(20):
            kind = "relay" if (n + i) % 2 else "outside"
            body = msg(body=b"%d %d\r\n" % (n, i))
            with sidecar.client() as c:
                if kind == "relay":
                    assert c.connect(RELAY) == "continue"
                    assert verify(c.send_message(body).message, dns) == [True]
                else:
                    assert c.connect(OUTSIDE) == "accept"
                    assert_pushed_unsigned(c, body)
            with lock:
                results[kind] += 1

    run_threads(8, client)
    assert results == {"relay": 80, "outside": 80}
