"""How a relayed connection ended, and what it did: the fields of its log line."""

from __future__ import annotations

import collections
import enum

import attrs


class Outcome(enum.Enum):
    """How a client connection ended (the ``outcome`` of ``switcher.proxy.connection_closed``)."""

    OK = "ok"  # the client closed with every request answered, some by an agent
    CLOSED_IDLE = "closed_idle"  # the client closed without sending a request
    NO_BACKEND = "no_backend"  # every request was answered FAILURE: no agent would take it
    BAD_REQUEST = "bad_request"  # a malformed frame (``reason`` says how)
    CLIENT_VANISHED = "client_vanished"  # the client went away while a reply was owed
    CLIENT_VANISHED_MID_REQUEST = "client_vanished_mid_request"  # ... or mid-request
    BACKEND_LOST = "backend_lost"  # the agent went away after a reply had been relayed
    PEER_REFUSED = "peer_refused"  # the client's uid is neither ours nor root
    CANCELLED = "cancelled"  # cut at shutdown, after the grace period
    CRASHED = "crashed"  # a bug (``switcher.proxy.connection_crashed`` has the traceback)


@attrs.define(eq=False)
class Tally:
    """What we log of a connection: counts and sizes, never contents."""

    request_types: collections.Counter[str] = attrs.Factory(collections.Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    served: int = 0
    answered_locally: int = 0
    failovers: int = 0

    def fields(self) -> dict[str, object]:
        return {
            "requests": dict(self.request_types),
            "replies": self.served,
            "answered_locally": self.answered_locally,
            "failovers": self.failovers,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


@attrs.frozen
class ConnectionResult:
    outcome: Outcome
    failovers: int = 0
    answered_locally: int = 0
    reason: str | None = None
