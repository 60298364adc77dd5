"""The agent proxy service: accept clients, check who they are, relay each one.

Three layers, as in trio's serve loop: ``_handle_client`` serves one
connection, ``accept_loop`` (in ``_accept``) starts one per accepted client,
``serve_agent_proxy`` is the service the daemon starts and stops.
"""

from __future__ import annotations

import functools
import os
import socket

import attrs
import structlog
import trio

from switcher.core._accept import (
    SocketListener,
    accept_loop,
    accept_socket_loop,
    descriptor_budget,
)
from switcher.core._affinity import Affinity
from switcher.core._hangup import HangupWatch
from switcher.core._loops import LoopGuard
from switcher.core._outcome import ConnectionResult, Outcome
from switcher.core._peer import peer_credentials, uid_allowed
from switcher.core._registry import Registry
from switcher.core._relay import relay_connection
from switcher.core._relaysocket import RelaySocket, detach
from switcher.core._upstream import Connector, Rescan

log = structlog.get_logger()


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

    @property
    def active_connections(self) -> int:
        return self._active

    def connection_started(self) -> None:
        """Count a client the serve loop accepted."""
        self._total += 1
        self._active += 1

    def connection_finished(self, result: ConnectionResult | None) -> None:
        """Count a client that is gone, with what its connection did."""
        self._active -= 1
        if result is not None:
            self._failovers += result.failovers
            self._answered_locally += result.answered_locally

    def stop_accepting(self) -> None:
        """Close the listener, then give open connections the grace period."""
        self._stop.set()

    async def wait_stop_requested(self) -> None:
        """Wait until ``stop_accepting`` is called."""
        await self._stop.wait()

    def mark_stopped(self) -> None:
        """The serve loop is done: every connection finished or was cut."""
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Wait until every connection has finished or been cut after the grace."""
        await self._stopped.wait()


async def _handle_client(
    client: socket.socket,
    *,
    registry: Registry,
    connect: Connector,
    rescan: Rescan,
    watch: HangupWatch,
    loops: LoopGuard | None,
    affinity: Affinity | None,
) -> ConnectionResult | None:
    """Serve one accepted client; None if it was gone before we could look at it."""
    try:
        peer = peer_credentials(client)
    except OSError:
        client.close()
        return None
    # This task's own copy of the context: every event it logs names the client.
    structlog.contextvars.bind_contextvars(client_pid=peer.pid, client_uid=peer.uid)
    if not uid_allowed(peer.uid, os.getuid()):
        # ssh-agent's rule, kept even if someone loosens the socket's mode.
        log.warning("switcher.proxy.peer_refused")
        client.close()
        return ConnectionResult(Outcome.PEER_REFUSED)
    try:
        return await relay_connection(
            RelaySocket(client),
            registry=registry,
            connect=connect,
            rescan=rescan,
            watch=watch,
            loops=loops,
            choose=functools.partial(affinity.decide, peer.pid) if affinity else None,
        )
    except Exception:
        # The one catch-all of a connection task, by design: the relay handles
        # every expected failure itself (and opens no nursery, so none arrives
        # as a group), so this is a bug, and it must not take the daemon and
        # every other client down with it. Log it loudly and carry on.
        log.exception("switcher.proxy.connection_crashed")
        return ConnectionResult(Outcome.CRASHED)


async def serve_agent_proxy(
    listener: SocketListener | trio.abc.Listener[trio.SocketStream],
    *,
    registry: Registry,
    rescan: Rescan,
    grace: float,
    connect: Connector,
    loops: LoopGuard | None = None,
    affinity: Affinity | None = None,
    task_status: trio.TaskStatus[ProxyServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept agent clients until told to stop, then drain them for ``grace`` seconds.

    Two nurseries, as in hypercorn: accepting stops first, so no new client
    arrives while the ones in flight finish their current requests. With
    ``loops`` (shared with the prober), the relay answers switcher's own loop
    checks and never relays into an agent that leads back here. Nothing
    expected escapes a connection task, so an error out of these nurseries
    is a bug or a listener that failed for good: it ends the service.
    With ``affinity``, each client is offered its own session's agent first.
    """
    server = ProxyServer()
    watch = HangupWatch()

    async def handle(client: socket.socket) -> None:
        server.connection_started()
        result = None
        try:
            result = await _handle_client(
                client,
                registry=registry,
                connect=connect,
                rescan=rescan,
                watch=watch,
                loops=loops,
                affinity=affinity,
            )
        finally:
            server.connection_finished(result)

    async def handle_stream(stream: trio.SocketStream) -> None:
        await handle(detach(stream))

    try:
        # The watch outlives the handlers (it serves them during the grace
        # too), so it sits in a nursery of its own around theirs.
        async with trio.open_nursery() as watching:
            watching.start_soon(watch.run)
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as acceptors:
                    # Admit no more clients than we have descriptors to relay:
                    # a client we accept must get its agent connection too.
                    admission = trio.Semaphore(descriptor_budget())
                    # A listener of plain sockets spares each client a trio
                    # stream that the relay would only unwrap again.
                    if isinstance(listener, SocketListener):
                        accepting = functools.partial(
                            accept_socket_loop, listener, handlers, handle
                        )
                    else:
                        accepting = functools.partial(
                            accept_loop, listener, handlers, handle_stream
                        )
                    acceptors.start_soon(
                        functools.partial(accepting, admission=admission, area="proxy")
                    )
                    task_status.started(server)
                    await server.wait_stop_requested()
                    acceptors.cancel_scope.cancel()
                await listener.aclose()
                handlers.cancel_scope.deadline = trio.current_time() + grace
            watching.cancel_scope.cancel()
    finally:
        server.mark_stopped()
