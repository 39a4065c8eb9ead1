"""The milter library (dkim_sidecar/milter/) on its own terms: a handler of the test's own,
no DKIM, no config, no metrics, over real loopback sockets, driven by the MTA-side client.
What it owns: negotiation, macros by stage, the held-reply rule under SMFIP_NR_*, the failure
answer, header insertion, QUIT_NC, and an MTA that offers too little."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import ClassVar

import pytest

from dkim_sidecar.milter import codec as p
from dkim_sidecar.milter.address import Listen
from dkim_sidecar.milter.api import Action, Macros, Options
from dkim_sidecar.milter.client import MilterClient
from dkim_sidecar.milter.server import MilterServer
from harness.sidecar import free_port

MESSAGE = b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
WANTED = p.P_NOHELO | p.P_NORCPT | p.P_NR_MAIL | p.P_NR_HDR | p.P_NR_EOH | p.P_NR_BODY
WANTED |= p.P_HDR_LEADSPC


class Recorder:
    """A handler that records each event, and answers as the test's script says."""

    made: ClassVar[list[Recorder]] = []

    def __init__(self, exact_headers: bool, script: dict[str, Action | Exception]) -> None:
        self.exact_headers = exact_headers
        self.script = script
        self.events: list[tuple[str, object]] = []
        Recorder.made.append(self)

    def _answer(self, event: str, detail: object = None, usual: Action = Action.CONTINUE) -> Action:
        self.events.append((event, detail))
        answer = self.script.get(event, usual)
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def in_progress(self) -> bool:
        return False

    def connect(self, client_ip: str | None) -> Action:
        return self._answer("connect", client_ip)

    def mail(self, sender: bytes, macros: Macros) -> Action:
        return self._answer("mail", (sender, macros("{auth_authen}"), macros("i")))

    def header(self, name: bytes, value: bytes) -> Action:
        return self._answer("header", (name, value))

    def end_of_headers(self, macros: Macros) -> Action:
        return self._answer("eoh", macros("i"))

    def body(self, chunk: bytes) -> Action:
        return self._answer("body", chunk)

    def end_of_message(self, macros: Macros) -> tuple[Action, list[bytes]]:
        return self._answer("eom", macros("i"), Action.ACCEPT), [b"X-Added: yes\r\n"]

    def abort(self) -> None:
        self.events.append(("abort", None))

    def close(self) -> None:
        self.events.append(("close", None))

    def failed(self) -> Action:
        self.events.append(("failed", None))
        return Action.TEMPFAIL


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, Action | Exception]], str]]:
    """serve(script) -> the address of a MilterServer whose handlers follow `script`."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers: list[MilterServer] = []
    Recorder.made.clear()

    def start(script: dict[str, Action | Exception]) -> str:
        options = Options(
            WANTED,
            p.F_ADDHDRS | p.F_SETSYMLIST,
            p.F_ADDHDRS,
            {p.M_ENVFROM: "{auth_authen}", p.M_EOH: "i", p.M_EOM: "i"},
            1 << 20,
        )
        server = MilterServer(lambda exact: Recorder(exact, script), options)
        port = free_port()
        asyncio.run_coroutine_threadsafe(
            server.start(Listen.parse(f"inet:127.0.0.1:{port}")), loop
        ).result(10)
        servers.append(server)
        return f"inet:127.0.0.1:{port}"

    yield start
    for server in servers:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_a_whole_message_with_macros_and_an_inserted_field(serve) -> None:
    with MilterClient(serve({}), timeout=10) as c:
        c.negotiate()
        assert c.protocol == WANTED  # what was asked, of what the client offered
        assert c.macros["M"] == ["{auth_authen}"] and c.macros["N"] == ["i"]
        assert c.connect("192.0.2.1") == "continue"
        result = c.send_message(MESSAGE, auth="bob", queue_id="Q1")
    assert result.action == "accept" and result.added == [] and result.inserted
    assert result.message.startswith(b"X-Added: yes\r\n")
    (handler,) = Recorder.made
    assert handler.exact_headers
    names = [e for e, _ in handler.events]
    assert names[:7] == ["connect", "mail", "header", "header", "eoh", "body", "eom"]
    assert handler.events[1] == ("mail", (b"sender@example.com", "bob", "Q1"))
    assert handler.events[2] == ("header", (b"From", b" a@example.com"))


@pytest.mark.parametrize(("stage", "answered_at"), [("mail", "data"), ("eoh", "eom")])
def test_a_decision_where_no_reply_goes_is_the_answer_to_the_next_reply(
    serve, stage: str, answered_at: str
) -> None:
    """SMFIP_NR_MAIL / NR_EOH: the MTA waits for no reply there; the decision (accept) is
    held and is the answer at the next command that has one, and nothing after it counts."""
    with MilterClient(serve({stage: Action.ACCEPT}), timeout=10) as c:
        c.negotiate()
        c.connect("192.0.2.1")
        result = c.send_message(MESSAGE)
    assert (result.action, result.stage) == ("accept", answered_at)
    assert result.inserted == []  # the held answer replaces the end of message's


def test_without_nr_options_every_command_is_answered_in_order(serve) -> None:
    """An MTA that offers no NR_* flags gets a reply for each command: a missing or extra one
    would shift every answer after it. Two messages on one connection."""
    offered = p.ALL_PROTOCOL & ~(
        p.P_NR_CONN | p.P_NR_HELO | p.P_NR_MAIL | p.P_NR_RCPT | p.P_NR_DATA
        | p.P_NR_UNKN | p.P_NR_EOH | p.P_NR_BODY | p.P_NR_HDR
    )  # fmt: skip
    with MilterClient(serve({}), timeout=10) as c:
        c.negotiate(protocol=offered)
        assert not c.protocol & (p.P_NR_MAIL | p.P_NR_HDR | p.P_NR_EOH | p.P_NR_BODY)
        c.connect("192.0.2.1")
        for _ in range(2):
            result = c.send_message(MESSAGE)
            assert result.action == "accept" and result.inserted


def test_a_handler_that_raises_gets_its_failure_answer(serve) -> None:
    with MilterClient(serve({"eoh": RuntimeError("bug")}), timeout=10) as c:
        c.negotiate()
        c.connect("192.0.2.1")
        result = c.send_message(MESSAGE)
    assert result.action == "tempfail"  # Recorder.failed(), held from the end of header
    assert ("failed", None) in Recorder.made[0].events


def test_quit_nc_starts_a_new_handler_on_the_same_socket(serve) -> None:
    with MilterClient(serve({}), timeout=10) as c:
        c.negotiate()
        c.connect("192.0.2.1")
        c._send(b"K")  # SMFIC_QUIT_NC: a new SMTP connection follows on this socket
        c.connect("192.0.2.2")
        assert c.send_message(MESSAGE).action == "accept"
    first, second = Recorder.made
    assert first.events[-1] == ("close", None) and second.events[0] == ("connect", "192.0.2.2")


def test_an_mta_that_cannot_add_fields_is_let_go_at_connect(serve) -> None:
    with MilterClient(serve({}), timeout=10) as c:
        c.negotiate(actions=p.F_SETSYMLIST)  # no SMFIF_ADDHDRS offered
        assert c.connect("192.0.2.1") == "accept"
    assert all(e != "connect" for e, _ in Recorder.made[0].events)


def test_a_command_before_negotiation_ends_the_connection(serve) -> None:
    with MilterClient(serve({}), timeout=10) as c:
        c._send(b"M", b"<a@example.com>\x00")  # MAIL with no option negotiation first
        with pytest.raises((p.ProtocolError, ConnectionError)):
            c._recv()


def test_quit_nc_before_negotiation_makes_no_handler(serve) -> None:
    """QUIT_NC keeps the negotiated options: with none negotiated, there is still no
    handler, and the MAIL that follows ends the connection."""
    with MilterClient(serve({}), timeout=10) as c:
        c._send(b"K")
        c._send(b"M", b"<a@example.com>\x00")
        with pytest.raises((p.ProtocolError, ConnectionError)):
            c._recv()
    assert Recorder.made == []
