"""The agent proxy: relay each client connection to the best live backend.

One client connection gets exactly one upstream connection at a time, never
shared or pooled: OpenSSH binds agent connections to sessions
(``session-bind@openssh.com``), and a binding lives as long as its
connection.

Failover is allowed only while no reply byte has reached the client. Until
then we keep every request the client sent; if the backend refuses,
resets, closes or speaks garbage, we mark it dead and replay those requests,
in order, to the next-ranked backend. Once a reply has been delivered, the
conversation belongs to that backend, and losing it closes the client.
"""

from __future__ import annotations

import collections
import functools
import os
import time
from collections.abc import Awaitable, Callable

import attrs
import structlog
import trio

from switcher.core._accept import accept_loop, descriptor_budget
from switcher.core._fastsocket import FastSocketStream, peer_closed
from switcher.core._peer import (
    BackendUnavailableError,
    LocalResourceError,
    PeerCredentials,
    describe_os_error,
    open_backend,
    peer_credentials,
    uid_allowed,
)
from switcher.core._protocol import FAILURE_FRAME, Frame, FrameDecoder, FrameError, type_name
from switcher.core._registry import Backend, Registry

log = structlog.get_logger()

# Reads are at most this big; a whole maximal message is 256 KiB + 4, so
# typical messages (a few hundred bytes) arrive in one read.
_RECEIVE_SIZE = 64 * 1024

# While a reply is owed, how often to check that the client is still there.
_CLIENT_CHECK_INTERVAL = 1.0

# Out of descriptors, how long a client we accepted waits for one to free
# up before it is answered FAILURE, and how often we try again meanwhile.
_RESOURCE_WAIT = 5.0
_RESOURCE_RETRY = 0.05

Connector = Callable[[Backend], Awaitable[trio.abc.Stream]]
Rescan = Callable[[], Awaitable[None]]


class _Lost(Exception):
    """The current backend failed; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Finished(Exception):
    """The conversation is over; ``outcome`` says how it ended."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


@attrs.define(eq=False)
class _Connection:
    """The state of one client connection through the proxy.

    It runs in lockstep, as the agent protocol does: take the requests the
    client has sent, forward them, deliver every reply, then read again.
    ssh-agent answers each connection strictly in order, so while replies
    are owed there is nothing to read from the client that could not wait
    in its socket buffer, and one task per connection is enough.
    """

    client: trio.abc.Stream
    registry: Registry
    connect: Connector
    rescan: Rescan
    decoder: FrameDecoder = attrs.Factory(FrameDecoder)
    upstream: trio.abc.Stream | None = None
    upstream_decoder: FrameDecoder = attrs.Factory(FrameDecoder)
    # Requests not yet answered, oldest first (their type bytes).
    outstanding: collections.deque[int] = attrs.Factory(collections.deque)
    # Requests received but not yet sent to the current backend.
    unsent: list[bytes] = attrs.Factory(list)
    # Every request since the start, while no reply has reached the client;
    # None once one has (committed). In lockstep this is only the batch in
    # hand (one read, at most one maximal message more), so it needs no cap.
    replay: list[bytes] | None = attrs.Factory(list)
    backend: Backend | None = None
    # What we log: counts and sizes only, never contents.
    request_types: collections.Counter[str] = attrs.Factory(collections.Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    served: int = 0
    answered_locally: int = 0
    failovers: int = 0
    # For the HangupWatch: since when a reply has been owed (trio time), and
    # the scope it cancels when the client went away meanwhile.
    waiting_since: float | None = None
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    vanished: bool = False

    def cut_if_vanished(self, now: float) -> None:
        """End this connection if its client left while a reply was long owed."""
        waiting_since = self.waiting_since
        if waiting_since is None or now - waiting_since < _CLIENT_CHECK_INTERVAL:
            return
        if peer_closed(self.client):
            self.vanished = True
            self.scope.cancel()

    def summary(self) -> dict[str, object]:
        """The connection's canonical log fields: sizes and counts, never contents."""
        return {
            "backend": self.backend.id if self.backend is not None else None,
            "requests": dict(self.request_types),
            "replies": self.served,
            "answered_locally": self.answered_locally,
            "failovers": self.failovers,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    async def run(self) -> str:
        """Serve the client until it or the conversation ends; return the outcome."""
        try:
            while (frames := await self._next_client_frames()) is not None:
                for frame in frames:
                    self._take_request(frame)
                await self._answer_all()
        finally:
            if self.upstream is not None:
                with trio.CancelScope(shield=True):
                    await self.upstream.aclose()
        # The client closed its side with every request answered: a
        # half-closed client got its replies first, since ssh-agent itself
        # drops a half-closed client without answering.
        if not self.request_types:
            return "closed_idle"
        return "ok" if self.served else "no_backend"

    # -- the client side -------------------------------------------------

    async def _next_client_frames(self) -> list[Frame] | None:
        """Wait for at least one whole request; None when the client is done."""
        while True:
            frames: list[Frame] = []
            try:
                while (frame := self.decoder.next_frame()) is not None:
                    frames.append(frame)
            except FrameError as exc:
                raise _Finished(f"bad request: {exc}") from None
            if frames:
                return frames
            try:
                data = await self.client.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Finished("client_vanished") from None
            if not data:
                if self.decoder.buffered:
                    raise _Finished("client_vanished_mid_request")
                return None
            self.bytes_in += len(data)
            self.decoder.feed(data)

    def _take_request(self, frame: Frame) -> None:
        self.request_types[type_name(frame.type)] += 1
        self.outstanding.append(frame.type)
        self.unsent.append(frame.raw)
        if self.replay is not None:
            self.replay.append(frame.raw)

    async def _send_client(self, data: bytes) -> None:
        try:
            await self.client.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Finished("client_vanished") from None
        self.bytes_out += len(data)

    # -- one exchange --------------------------------------------------------

    async def _answer_all(self) -> None:
        """Get every outstanding request answered, failing over while we may."""
        tried: set[str] = set()
        while self.outstanding:
            if self.upstream is None and not await self._attach(tried):
                await self._answer_locally()
                return
            assert self.upstream is not None
            try:
                await self._exchange(self.upstream)
            except _Lost as lost:
                await self._fail_over(lost)

    async def _exchange(self, upstream: trio.abc.Stream) -> None:
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
            # reply cut off by a dying backend never commits us to it.
            self.replay = None
            for _ in range(min(len(replies), len(self.outstanding))):
                self.outstanding.popleft()
            self.served += len(replies)
            await self._send_client(b"".join(replies))

    async def _receive_reply(self, upstream: trio.abc.Stream) -> bytes | bytearray:
        """Wait for reply bytes for as long as the agent needs.

        No timeout: a touch or a confirmation may take minutes. A client that
        goes away meanwhile is noticed by the HangupWatch, which reads
        ``waiting_since`` (a per-reply timeout here cost a tenth of the
        relay's CPU time in profiles).
        """
        self.waiting_since = trio.current_time()
        try:
            return await upstream.receive_some(_RECEIVE_SIZE)
        finally:
            self.waiting_since = None

    async def _fail_over(self, lost: _Lost) -> None:
        """The backend failed: replay to the next one if no reply reached the client yet."""
        assert self.upstream is not None and self.backend is not None
        with trio.CancelScope(shield=True):
            await self.upstream.aclose()
        self.upstream = None
        if self.replay is None:
            # A reply reached the client: the conversation belonged to that session.
            raise _Finished("backend_lost")
        # Nothing reached the client yet: it will never know.
        self.registry.record_failure(self.backend.id, lost.reason)
        self.registry.record_traffic(self.backend.id, served=0, failed=len(self.outstanding))
        log.warning(
            "switcher.proxy.failover",
            backend=self.backend.id,
            reason=lost.reason,
            replayed=len(self.replay),
        )
        self.failovers += 1
        self.unsent = list(self.replay)
        self.upstream_decoder = FrameDecoder()

    async def _attach(self, tried: set[str]) -> bool:
        """Connect to the best backend not tried yet; False if none would take us.

        In rank order: every usable backend; on a miss, the same after a
        rescan (a session may have appeared since the last one); and last,
        before telling the client FAILURE, the ones judged dead, since a
        judgement can be stale (a socket probed between sshd's bind() and
        listen() looks dead until the next probe).
        """
        for attempt in ("usable", "rescanned", "dead"):
            if attempt == "rescanned":
                await self.rescan()
            snapshot = self.registry.snapshot()
            candidates = snapshot.dead if attempt == "dead" else snapshot.usable
            for backend in candidates:
                if backend.id in tried:
                    continue
                tried.add(backend.id)
                try:
                    self.upstream = await self._connect(backend)
                except LocalResourceError:
                    return False
                except BackendUnavailableError as exc:
                    self.registry.record_failure(backend.id, str(exc))
                    if attempt != "dead":
                        log.warning(
                            "switcher.proxy.backend_unavailable",
                            backend=backend.id,
                            reason=str(exc),
                        )
                    continue
                self.backend = backend
                return True
        return False

    async def _connect(self, backend: Backend) -> trio.abc.Stream:
        """Connect, waiting a little if we are out of descriptors.

        Running out is our shortage, not the backend's fault: connections
        in flight will finish and free some, so a client we accepted is
        better served late than failed at once.
        """
        deadline = trio.current_time() + _RESOURCE_WAIT
        while True:
            try:
                return await self.connect(backend)
            except LocalResourceError as exc:
                if trio.current_time() >= deadline:
                    log.error("switcher.proxy.no_resources", reason=str(exc))
                    raise
                await trio.sleep(_RESOURCE_RETRY)

    async def _answer_locally(self) -> None:
        """No backend at all: fail every waiting request at once, so clients don't hang."""
        count = len(self.outstanding)
        self.outstanding.clear()
        self.unsent.clear()
        self.answered_locally += count
        if self.replay is not None:
            self.replay.clear()
        await self._send_client(FAILURE_FRAME * count)


def _reason(exc: BaseException) -> str:
    """A short reason for a broken stream: the OS error underneath, if there is one."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        return describe_os_error(cause)
    return "connection lost"


@attrs.frozen
class ConnectionResult:
    outcome: str
    failovers: int
    answered_locally: int


async def relay_connection(
    client: trio.abc.Stream,
    *,
    registry: Registry,
    connect: Connector,
    rescan: Rescan,
    peer: PeerCredentials | None = None,
    watch: HangupWatch | None = None,
) -> ConnectionResult:
    """Serve one client connection to the end, log it once, say how it went.

    Expected failures (a client or backend that vanished, a malformed frame)
    end only this connection. The stream is closed on return.
    """
    started = time.perf_counter()
    connection = _Connection(client, registry, connect, rescan)
    outcome = "error"
    if watch is not None:
        watch.connections.add(connection)
    try:
        with connection.scope:
            outcome = await connection.run()
        if connection.vanished:
            outcome = "client_vanished"
    except _Finished as finished:
        outcome = finished.outcome
    finally:
        if watch is not None:
            watch.connections.discard(connection)
        if connection.backend is not None:
            revived = registry.record_traffic(
                connection.backend.id,
                served=connection.served,
                failed=len(connection.outstanding) if outcome != "ok" else 0,
            )
            if revived is not None:
                log.info(
                    "switcher.prober.health_changed",
                    backend=revived.backend.id,
                    path=revived.backend.path,
                    previous=revived.previous.value,
                    health=revived.backend.health.value,
                    reason="answered a client",
                )
        with trio.CancelScope(shield=True):
            await client.aclose()
        log.info(
            "switcher.proxy.connection_closed",
            client_pid=peer.pid if peer else None,
            client_uid=peer.uid if peer else None,
            outcome=outcome,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            **connection.summary(),
        )
    return ConnectionResult(outcome, connection.failovers, connection.answered_locally)


@attrs.define(eq=False)
class HangupWatch:
    """Ends connections whose client left while a reply was long owed.

    The relay does not read the client while it waits for the agent (the
    protocol is lockstep), so a client that gives up on a touch that never
    comes would otherwise pin two descriptors for as long as the agent
    takes. Once a second, this looks at the connections that have waited
    that long and asks the kernel whether their client hung up (POLLHUP:
    a full close, not a half-close that still wants its reply).
    """

    connections: set[_Connection] = attrs.Factory(set)

    async def run(self) -> None:
        while True:
            await trio.sleep(_CLIENT_CHECK_INTERVAL)
            now = trio.current_time()
            for connection in list(self.connections):
                connection.cut_if_vanished(now)


def unix_connector(*, refuse_pid: int | None) -> Connector:
    """The production connector: a fresh Unix connection with the peer checked."""

    async def connect(backend: Backend) -> trio.abc.Stream:
        return await open_backend(backend.path, refuse_pid=refuse_pid)

    return connect


async def _handle_client(
    client: trio.SocketStream,
    *,
    registry: Registry,
    connect: Connector,
    rescan: Rescan,
    watch: HangupWatch,
) -> ConnectionResult | None:
    try:
        peer = peer_credentials(client.socket)
    except OSError:
        await client.aclose()  # gone before we could look at it
        return None
    if not uid_allowed(peer.uid, os.getuid()):
        # ssh-agent's rule, kept even if someone loosens the socket's mode.
        log.warning("switcher.proxy.peer_refused", client_pid=peer.pid, client_uid=peer.uid)
        await client.aclose()
        return ConnectionResult("peer_refused", 0, 0)
    try:
        return await relay_connection(
            FastSocketStream.from_trio(client),
            registry=registry,
            connect=connect,
            rescan=rescan,
            peer=peer,
            watch=watch,
        )
    except Exception:
        # A bug in one connection must not take the daemon and every other
        # client down with it; log it loudly and carry on.
        log.exception("switcher.proxy.connection_crashed", client_pid=peer.pid)
        return ConnectionResult("crashed", 0, 0)


@attrs.frozen
class ProxyStatistics:
    total: int
    active: int
    failovers: int
    answered_locally: int


@attrs.define(eq=False)
class ProxyServer:
    """Handle on the running proxy service: statistics and graceful shutdown."""

    _stop: trio.Event = attrs.Factory(trio.Event)
    _stopped: trio.Event = attrs.Factory(trio.Event)
    _active: int = 0
    _total: int = 0
    _failovers: int = 0
    _answered_locally: int = 0

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            total=self._total,
            active=self._active,
            failovers=self._failovers,
            answered_locally=self._answered_locally,
        )

    def _connection_started(self) -> None:
        self._total += 1
        self._active += 1

    def _connection_finished(self, result: ConnectionResult | None) -> None:
        self._active -= 1
        if result is not None:
            self._failovers += result.failovers
            self._answered_locally += result.answered_locally

    def stop_accepting(self) -> None:
        """Close the listener, then give open connections the grace period."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        """Wait until every connection has finished or been cut after the grace."""
        await self._stopped.wait()

    @property
    def active_connections(self) -> int:
        return self._active


async def serve_agent_proxy(
    listener: trio.abc.Listener[trio.SocketStream],
    *,
    registry: Registry,
    rescan: Rescan,
    grace: float,
    connect: Connector,
    task_status: trio.TaskStatus[ProxyServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept agent clients until told to stop, then drain them for ``grace`` seconds.

    Two nurseries, as in hypercorn: accepting stops first, so no new client
    arrives while the ones in flight finish their current requests.
    """
    server = ProxyServer()
    watch = HangupWatch()

    async def handle(stream: trio.SocketStream) -> None:
        server._connection_started()  # noqa: SLF001
        result = None
        try:
            result = await _handle_client(
                stream, registry=registry, connect=connect, rescan=rescan, watch=watch
            )
        finally:
            server._connection_finished(result)  # noqa: SLF001

    try:
        # The watch outlives the handlers (it serves them during the grace
        # too), so it sits in a nursery of its own around theirs.
        async with trio.open_nursery() as watching:
            watching.start_soon(watch.run)
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as acceptors:
                    # Admit no more clients than we have descriptors to relay:
                    # a client we accept must get its backend connection too.
                    admission = trio.Semaphore(descriptor_budget())
                    acceptors.start_soon(
                        functools.partial(accept_loop, admission=admission),
                        listener,
                        handlers,
                        handle,
                    )
                    task_status.started(server)
                    await server._stop.wait()  # noqa: SLF001
                    acceptors.cancel_scope.cancel()
                await listener.aclose()
                handlers.cancel_scope.deadline = trio.current_time() + grace
            watching.cancel_scope.cancel()
    finally:
        server._stopped.set()  # noqa: SLF001
