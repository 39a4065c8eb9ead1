"""What an application gives the milter server: a handler per connection (what each event
means), the options it asks of the MTA, and optionally a gate on the peers that may talk."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Action", "Handler", "Macros", "Options", "PeerGate"]


class Action(enum.Enum):
    """A handler's answer to an event."""

    CONTINUE = "continue"
    ACCEPT = "accept"  # no more events for this message (or connection, at connect)
    TEMPFAIL = "tempfail"


# A macro's value by name, looked up in the event's stage and then the stages before it
Macros = Callable[[str], str | None]


class Handler(Protocol):
    """One connection's application side: what each event means. Any exception a method
    raises is answered with `failed()` (the application's failure policy)."""

    @property
    def in_progress(self) -> bool: ...  # a message between MAIL and its end

    def connect(self, client_ip: str | None) -> Action: ...

    def mail(self, sender: bytes, macros: Macros) -> Action: ...

    def header(self, name: bytes, value: bytes) -> Action: ...

    def end_of_headers(self, macros: Macros) -> Action: ...

    def body(self, chunk: bytes) -> Action: ...

    def end_of_message(self, macros: Macros) -> tuple[Action, list[bytes]]:
        """The answer, and raw header fields (CRLF-ended) to insert at the top, first topmost."""
        ...

    def abort(self) -> None: ...

    def close(self) -> None: ...

    def failed(self) -> Action: ...


class PeerGate(Protocol):
    """Who may talk (inet listeners): decided by the TCP peer address of the connection."""

    @property
    def generation(self) -> int: ...  # changes whenever allows() may answer differently

    def allows(self, ip: str) -> bool: ...

    def may_retry(self) -> bool: ...  # may an unknown peer have retry() run now?

    def retry(self) -> None: ...  # blocking (run in a worker thread): e.g. resolve names again

    def refused(self, ip: str) -> None: ...  # a connection from `ip` is being closed


@dataclass(frozen=True)
class Options:
    """What the application asks of the MTA at negotiation."""

    protocol: int  # SMFIP_* steps to skip and replies to do without (what the MTA offers of them)
    actions: int  # SMFIF_* actions wanted (what the MTA offers of them)
    required: int  # of those, the ones without which the handler has nothing to do: an MTA
    #               that does not offer them all gets every connection let go at connect
    macros: Mapping[int, str]  # macro names per stage (SMFIR_SETSYMLIST, if the MTA can)
    max_packet: int  # the largest packet taken; a larger one ends the connection
