"""Session, in process and alone: every Reason a message can end with, the decisions at each
event, a second connect on one connection (XCLIENT), and a reload between two messages. No
protocol, no sockets: the events are called as the milter server would call them, and every
signature is checked by dkimpy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import dkim
import pytest

from dkim_sidecar.config import Config, DomainFrom, Limits, OnError, parse_config
from dkim_sidecar.dkim.keys import Algorithm, SigningKey, generate_key
from dkim_sidecar.keysources.local import KeySet
from dkim_sidecar.milter.api import Action
from dkim_sidecar.runtime import Runtime
from dkim_sidecar.session import MessageReport, Reason, Session

RELAY = "192.0.2.10"
OUTSIDE = "203.0.113.9"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.load("example.com", "s1", generate_key(Algorithm.ED25519_SHA256))


def runtime(key: SigningKey, **config: object) -> Runtime:
    base = parse_config({"relay_networks": ["192.0.2.0/24"]}, "t", {})
    return Runtime.build(replace(base, **config), KeySet({key.domain: (key,)}))  # type: ignore[arg-type]


class Run:
    """A Session with its reports collected; `snapshot` may be swapped between events."""

    def __init__(self, rt: Runtime, exact_headers: bool = True) -> None:
        self.rt = rt
        self.reports: list[MessageReport] = []
        self.session = Session(lambda: self.rt, self.reports.append, exact_headers=exact_headers)

    def message(
        self,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"Hello.\r\n",
        *,
        client: str | None = RELAY,
        sender: bytes = b"<alice@example.com>",
        auth: str | None = None,
        connect: bool = True,
    ) -> tuple[list[Action], list[bytes]]:
        """The events of one message; the answers to each, and the fields inserted."""
        s = self.session
        answers: list[Action] = []
        if connect:
            answers.append(s.connect(client))
            if answers[-1] is Action.ACCEPT:  # the MTA sends nothing more on this connection
                return answers, []
        macros: Callable[[str], str | None] = lambda name: {  # noqa: E731
            "{auth_authen}": auth,
            "i": "QID1",
        }.get(name)
        answers.append(s.mail(sender, macros))
        for name, value in headers:
            answers.append(s.header(name, value))
        answers.append(s.end_of_headers(macros))
        answers.append(s.body(body))
        action, fields = s.end_of_message(macros)
        answers.append(action)
        return answers, fields


FROM = [(b"From", b" Alice <alice@example.com>"), (b"Subject", b" hi")]


def signed_ok(fields: list[bytes], headers: list[tuple[bytes, bytes]], key: SigningKey) -> bool:
    message = b"".join(fields) + b"".join(n + b":" + v + b"\r\n" for n, v in headers)
    message += b"\r\nHello.\r\n"
    record = key.dns_record().encode()
    return bool(dkim.verify(message, dnsfunc=lambda name, timeout=5: record))


def test_a_relay_clients_message_is_signed(key: SigningKey) -> None:
    run = Run(runtime(key))
    answers, fields = run.message(FROM)
    assert answers[-1] is Action.ACCEPT and len(fields) == 1
    assert signed_ok(fields, FROM, key)
    (report,) = run.reports
    assert report.reason is Reason.SIGNED and report.queue_id == "QID1"
    assert report.domain == "example.com" and report.keys == (key,)


@pytest.mark.parametrize(
    ("reason", "headers", "kwargs", "config"),
    [
        (Reason.NOT_RELAY, FROM, {"client": OUTSIDE}, {}),
        (Reason.AUTHENTICATED, FROM, {"auth": "bob"}, {}),
        (Reason.NO_KEY, [(b"From", b" bob@example.net")], {}, {}),
        (Reason.NO_FROM, [(b"Subject", b" hi")], {}, {}),
        (Reason.MULTIPLE_FROM, [*FROM, (b"From", b" b@example.com")], {}, {}),
        (Reason.BAD_FROM, [(b"From", b" undisclosed recipients")], {}, {}),
        (Reason.NO_SENDER, FROM, {"sender": b"<>"}, {"domain_from": DomainFrom.ENVELOPE}),
        (Reason.HEADER_LIMIT, FROM, {}, {"limits": Limits(max_headers=1)}),
        (
            Reason.ALREADY_SIGNED,
            [(b"DKIM-Signature", b" v=1; a=rsa-sha256; d=example.com; s=x; bh=x; b=x"), *FROM],
            {},
            {},
        ),
    ],
)
def test_each_reason_to_let_a_message_go_unsigned(
    key: SigningKey,
    reason: Reason,
    headers: list[tuple[bytes, bytes]],
    kwargs: dict[str, object],
    config: dict[str, object],
) -> None:
    run = Run(runtime(key, **config))
    answers, fields = run.message(headers, **kwargs)  # type: ignore[arg-type]
    assert fields == [] and Action.TEMPFAIL not in answers
    if reason is Reason.NOT_RELAY:  # let go at connect: the connection, not a message
        assert answers[0] is Action.ACCEPT
    assert [r.reason for r in run.reports] == [reason], run.reports
    assert reason.outcome == "skipped"


def test_long_lines_and_inexact_headers(key: SigningKey) -> None:
    run = Run(runtime(key))
    _, fields = run.message(FROM, body=b"x" * 999 + b"\r\n")
    assert fields == [] and run.reports[-1].reason is Reason.LONG_LINES
    run = Run(runtime(key), exact_headers=False)  # an MTA that did not agree to LEADSPC
    _, fields = run.message(FROM)
    assert fields == [] and run.reports[-1].reason is Reason.INEXACT_HEADERS


def test_abort_and_close_report_the_message_once(key: SigningKey) -> None:
    run = Run(runtime(key))
    s = run.session
    s.connect(RELAY)
    s.mail(b"<alice@example.com>", lambda name: None)
    assert s.in_progress
    s.abort()
    s.close()
    assert [r.reason for r in run.reports] == [Reason.ABORTED] and not s.in_progress


@pytest.mark.parametrize(
    ("on_error", "answer"), [(OnError.ACCEPT, Action.ACCEPT), (OnError.TEMPFAIL, Action.TEMPFAIL)]
)
def test_failed_is_the_one_failure_policy(
    key: SigningKey, on_error: OnError, answer: Action
) -> None:
    run = Run(runtime(key, on_error=on_error))
    s = run.session
    s.connect(RELAY)
    s.mail(b"<alice@example.com>", lambda name: None)
    assert s.failed() is answer
    assert [(r.reason, r.action) for r in run.reports] == [(Reason.ERROR, answer)]
    assert s.failed() is answer and len(run.reports) == 1  # no message: nothing more reported


def test_a_second_connect_is_a_new_client(key: SigningKey) -> None:
    """XCLIENT: Postfix sends another connect on the same milter connection; the latest
    client is the one that counts, both ways."""
    run = Run(runtime(key))
    assert run.session.connect(RELAY) is Action.CONTINUE
    answers, fields = run.message(FROM, client=OUTSIDE)
    assert answers[0] is Action.ACCEPT and fields == []
    answers, fields = run.message(FROM, client=RELAY)
    assert answers[0] is Action.CONTINUE and len(fields) == 1


def test_a_reload_between_two_messages_of_one_connection(key: SigningKey) -> None:
    """Each message keeps the snapshot it started with; the next one takes the new one."""
    run = Run(runtime(key))
    _, fields = run.message(FROM)
    assert len(fields) == 1
    run.rt = runtime(key, relay_networks=())  # a reload took the relay network away
    _, fields = run.message(FROM, connect=False)  # same connection, next message
    assert fields == [] and run.reports[-1].reason is Reason.NOT_RELAY
    # and a reload in the middle of a message does not change that message
    run.rt = runtime(key)
    s = run.session
    s.connect(RELAY)
    s.mail(b"<alice@example.com>", lambda name: None)
    run.rt = runtime(key, relay_networks=())
    for name, value in FROM:
        s.header(name, value)
    s.end_of_headers(lambda name: None)
    s.body(b"Hello.\r\n")
    action, fields = s.end_of_message(lambda name: None)
    assert action is Action.ACCEPT and signed_ok(fields, FROM, key)


def test_every_reason_is_reachable() -> None:
    """The tests above end a message with each Reason (a new Reason needs a test here)."""
    covered = {
        Reason.SIGNED, Reason.NOT_RELAY, Reason.AUTHENTICATED, Reason.NO_KEY,
        Reason.ALREADY_SIGNED, Reason.NO_FROM, Reason.MULTIPLE_FROM, Reason.BAD_FROM,
        Reason.NO_SENDER, Reason.HEADER_LIMIT, Reason.LONG_LINES, Reason.INEXACT_HEADERS,
        Reason.ABORTED, Reason.ERROR,
    }  # fmt: skip
    assert covered == set(Reason)
    assert Config().on_error is OnError.ACCEPT
