"""The relay: one client connection, served to the end by the best live agent.

One client connection gets exactly one upstream connection at a time, never
shared or pooled: OpenSSH binds agent connections to sessions
(``session-bind@openssh.com``), and a binding lives as long as its
connection.

Failover is allowed only while no reply byte has reached the client. Until
then we keep every request the client sent; if the agent refuses, resets,
closes or speaks garbage, we mark it dead and replay those requests, in
order, to the next-ranked agent. Once a reply has been delivered, the
conversation belongs to that agent, and losing it closes the client.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable

import attrs
import structlog
import trio

from switcher.core._affinity import Decision, without_lookup
from switcher.core._backend import Backend, Snapshot
from switcher.core._hangup import HangupWatch
from switcher.core._loops import LoopGuard, is_session_bind
from switcher.core._outcome import ConnectionResult, Outcome, Tally
from switcher.core._peer import describe_os_error
from switcher.core._protocol import FAILURE_FRAME, Frame, FrameDecoder, FrameError, type_name
from switcher.core._registry import Registry
from switcher.core._relaysocket import RelayStream, close_quietly, peer_closed
from switcher.core._upstream import Connector, Rescan, attach

log = structlog.get_logger()

# Session affinity for this connection's client: which agent to prefer, and why.
Chooser = Callable[[Snapshot], Awaitable[Decision]]

# Reads are at most this big; a whole maximal message is 256 KiB + 4, so
# typical messages (a few hundred bytes) arrive in one read.
_RECEIVE_SIZE = 64 * 1024


class _Lost(Exception):
    """The current agent failed; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Finished(Exception):
    """The conversation is over; ``outcome`` says how it ended."""

    def __init__(self, outcome: Outcome, reason: str | None = None) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome
        self.reason = reason


@attrs.define(eq=False)
class _Connection:
    """The state of one client connection through the proxy.

    It runs in lockstep, as the agent protocol does: take the requests the
    client has sent, forward them, deliver every reply, then read again.
    ssh-agent answers each connection strictly in order, so while replies
    are owed there is nothing to read from the client that could not wait
    in its socket buffer, and one task per connection is enough.
    """

    client: RelayStream
    registry: Registry
    connect: Connector
    rescan: Rescan
    watch: HangupWatch | None
    loops: LoopGuard | None
    choose: Chooser | None = None
    # How the first agent was chosen; None until the first request.
    decision: Decision | None = None
    tally: Tally = attrs.Factory(Tally)
    decoder: FrameDecoder = attrs.Factory(FrameDecoder)
    upstream: RelayStream | None = None
    upstream_decoder: FrameDecoder = attrs.Factory(FrameDecoder)
    backend: Backend | None = None
    # Requests not yet answered, oldest first (their type bytes).
    outstanding: collections.deque[int] = attrs.Factory(collections.deque)
    # Requests received but not yet sent to the current agent.
    unsent: list[bytes] = attrs.Factory(list)
    # Every request since the start, while no reply has reached the client;
    # None once one has (committed). In lockstep this is only the batch in
    # hand (one read, at most one maximal message more), so it needs no cap.
    replay: list[bytes] | None = attrs.Factory(list)
    # Cancelled by the HangupWatch when the client went away while it waited.
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    vanished: bool = False

    # -- what the HangupWatch asks of a waiter ----------------------------

    def client_hung_up(self) -> bool:
        return peer_closed(self.client)

    def cut(self) -> None:
        self.vanished = True
        self.scope.cancel()

    # -- the conversation ---------------------------------------------------

    async def run(self) -> Outcome:
        """Serve the client until it or the conversation ends; return the outcome."""
        try:
            while (frames := await self._next_client_frames()) is not None:
                for frame in frames:
                    if self.loops is not None and self.loops.claims(frame):
                        await self._answer_loop_check(frame)
                    else:
                        self._take_request(frame)
                await self._answer_all()
        finally:
            if self.upstream is not None:
                await close_quietly(self.upstream)
        # The client closed its side with every request answered: a
        # half-closed client got its replies first, since ssh-agent itself
        # drops a half-closed client without answering.
        if not self.tally.request_types:
            return Outcome.CLOSED_IDLE
        return Outcome.OK if self.tally.served else Outcome.NO_BACKEND

    async def _next_client_frames(self) -> list[Frame] | None:
        """Wait for at least one whole request; None when the client is done."""
        while True:
            frames: list[Frame] = []
            try:
                while (frame := self.decoder.next_frame()) is not None:
                    frames.append(frame)
            except FrameError as exc:
                raise _Finished(Outcome.BAD_REQUEST, str(exc)) from None
            if frames:
                return frames
            try:
                data = await self.client.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Finished(Outcome.CLIENT_VANISHED) from None
            if not data:
                if self.decoder.buffered:
                    raise _Finished(Outcome.CLIENT_VANISHED_MID_REQUEST)
                return None
            self.tally.bytes_in += len(data)
            self.decoder.feed(data)

    async def _answer_loop_check(self, frame: Frame) -> None:
        """Our own loop check came back: FAILURE at once (after what came before it)."""
        await self._answer_all()
        self.tally.request_types[type_name(frame.type)] += 1
        self.tally.answered_locally += 1
        await self._send_client(FAILURE_FRAME)

    def _take_request(self, frame: Frame) -> None:
        self.tally.request_types[type_name(frame.type)] += 1
        self.outstanding.append(frame.type)
        self.unsent.append(frame.raw)
        if self.replay is not None:
            self.replay.append(frame.raw)

    async def _send_client(self, data: bytes) -> None:
        try:
            await self.client.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Finished(Outcome.CLIENT_VANISHED) from None
        self.tally.bytes_out += len(data)

    async def _answer_all(self) -> None:
        """Get every outstanding request answered, failing over while we may."""
        tried: set[str] = set()
        while self.outstanding:
            if self.upstream is None:
                if self.decision is None:
                    self.decision = await self._decide()
                preferred = self.decision.backend
                attached = await attach(
                    self.registry,
                    self.connect,
                    self.rescan,
                    tried,
                    self.loops,
                    binding=bool(self.unsent) and is_session_bind(self.unsent[0]),
                    preferred=preferred.id if preferred is not None else None,
                )
                if attached is None:
                    await self._answer_locally()
                    return
                self.backend, self.upstream = attached
            try:
                await self._exchange(self.upstream)
            except _Lost as lost:
                await self._fail_over(lost)

    async def _decide(self) -> Decision:
        """Which agent to try first: affinity's choice, asked only when it could matter.

        With fewer than two usable agents (the common case) no process is
        looked at: the pin or the ranking decides, at no cost.
        """
        snapshot = self.registry.snapshot()
        if self.choose is None or len(snapshot.usable) < 2:
            return without_lookup(snapshot)
        return await self.choose(snapshot)

    async def _exchange(self, upstream: RelayStream) -> None:
        """Send what is unsent, then relay replies until none is owed."""
        if self.unsent:
            requests = b"".join(self.unsent)
            self.unsent.clear()
            try:
                await upstream.send_all(requests)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Lost(_reason(exc)) from None
        while self.outstanding:
            try:
                data = await self._receive_reply(upstream)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Lost(_reason(exc)) from None
            if not data:
                raise _Lost("closed before answering")
            self.upstream_decoder.feed(data)
            replies: list[bytes] = []
            try:
                while (frame := self.upstream_decoder.next_frame()) is not None:
                    replies.append(frame.raw)
            except FrameError as exc:
                raise _Lost(f"bad reply: {exc}") from None
            if not replies:
                continue
            # Whole replies only: the client never sees half a message, and a
            # reply cut off by a dying agent never commits us to it.
            self.replay = None
            for _ in range(min(len(replies), len(self.outstanding))):
                self.outstanding.popleft()
            self.tally.served += len(replies)
            await self._send_client(b"".join(replies))

    async def _receive_reply(self, upstream: RelayStream) -> bytes | bytearray:
        """Wait for reply bytes for as long as the agent needs.

        No timeout: a touch or a confirmation may take minutes. A client that
        goes away meanwhile is noticed by the HangupWatch (a per-reply
        timeout here cost a tenth of the relay's CPU time in profiles).
        """
        if self.watch is None:
            return await upstream.receive_some(_RECEIVE_SIZE)
        self.watch.start_waiting(self)
        try:
            return await upstream.receive_some(_RECEIVE_SIZE)
        finally:
            self.watch.stop_waiting(self)

    async def _fail_over(self, lost: _Lost) -> None:
        """The agent failed: replay to the next one if no reply reached the client yet."""
        assert self.upstream is not None and self.backend is not None
        await close_quietly(self.upstream)
        self.upstream = None
        if self.replay is None:
            # A reply reached the client: the conversation belonged to that session.
            raise _Finished(Outcome.BACKEND_LOST, lost.reason)
        # Nothing reached the client yet: it will never know.
        self.registry.record_failure(self.backend.id, lost.reason)
        self.registry.record_traffic(self.backend.id, served=0, failed=len(self.outstanding))
        log.warning(
            "switcher.proxy.failover",
            backend=self.backend.id,
            reason=lost.reason,
            replayed=len(self.replay),
        )
        self.tally.failovers += 1
        self.unsent = list(self.replay)
        self.upstream_decoder = FrameDecoder()

    async def _answer_locally(self) -> None:
        """No agent at all: fail every waiting request at once, so clients don't hang."""
        count = len(self.outstanding)
        self.outstanding.clear()
        self.unsent.clear()
        self.tally.answered_locally += count
        if self.replay is not None:
            self.replay.clear()
        await self._send_client(FAILURE_FRAME * count)


def _reason(exc: BaseException) -> str:
    """A short reason for a broken stream: the OS error underneath, if there is one."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        return describe_os_error(cause)
    return "connection lost"


# The log fields of a connection that never needed an agent.
_NOT_CHOSEN: dict[str, object] = {"chosen_by": None}


async def relay_connection(
    client: RelayStream,
    *,
    registry: Registry,
    connect: Connector,
    rescan: Rescan,
    watch: HangupWatch | None = None,
    loops: LoopGuard | None = None,
    choose: Chooser | None = None,
) -> ConnectionResult:
    """Serve one client connection to the end, log it once, say how it went.

    Expected failures (a client or agent that vanished, a malformed frame)
    end only this connection. The stream is closed on return. Who the
    client is (pid, uid) comes from the structlog context the caller bound.
    ``choose`` is session affinity for this client (None: the pin or the
    ranking decides).
    """
    started = time.perf_counter()
    connection = _Connection(client, registry, connect, rescan, watch, loops, choose)
    outcome, reason = Outcome.CRASHED, None
    try:
        with connection.scope:
            outcome = await connection.run()
        if connection.vanished:
            outcome = Outcome.CLIENT_VANISHED
    except _Finished as finished:
        outcome, reason = finished.outcome, finished.reason
    except trio.Cancelled:
        outcome = Outcome.CANCELLED
        raise
    finally:
        tally = connection.tally
        if connection.backend is not None:
            # An agent judged dead that answered is healthy again (the
            # registry logs the change).
            registry.record_traffic(
                connection.backend.id,
                served=tally.served,
                failed=len(connection.outstanding) if outcome is not Outcome.OK else 0,
            )
        await close_quietly(client)
        log.info(
            "switcher.proxy.connection_closed",
            outcome=outcome.value,
            reason=reason,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            backend=connection.backend.id if connection.backend is not None else None,
            **tally.fields(),
            **(connection.decision.log_fields() if connection.decision else _NOT_CHOSEN),
        )
    return ConnectionResult(outcome, tally.failovers, tally.answered_locally, reason)
