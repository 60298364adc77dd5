"""Reaching an agent for a client: the best one that will take the connection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
import trio

from switcher.core._peer import BackendUnavailableError, LocalResourceError, open_backend
from switcher.core._registry import Backend, Registry
from switcher.core._relaysocket import RelayStream

log = structlog.get_logger()

# Out of descriptors, how long a client we accepted waits for one to free
# up before it is answered FAILURE, and how often we try again meanwhile.
_RESOURCE_WAIT = 5.0
_RESOURCE_RETRY = 0.05

Connector = Callable[[Backend], Awaitable[RelayStream]]
Rescan = Callable[[], Awaitable[None]]


def unix_connector(*, refuse_pid: int | None) -> Connector:
    """The production connector: a fresh Unix connection with the peer checked."""

    async def connect(backend: Backend) -> RelayStream:
        return await open_backend(backend.path, refuse_pid=refuse_pid)

    return connect


async def attach(
    registry: Registry, connect: Connector, rescan: Rescan, tried: set[str]
) -> tuple[Backend, RelayStream] | None:
    """Connect to the best agent not tried yet; None if none would take us.

    In rank order: every usable agent; on a miss, the same after a rescan (a
    session may have appeared since the last one); and last, before telling
    the client FAILURE, the ones judged dead, since a judgement can be stale
    (a socket probed between sshd's bind() and listen() looks dead until the
    next probe).
    """
    for attempt in ("usable", "rescanned", "dead"):
        if attempt == "rescanned":
            await rescan()
        snapshot = registry.snapshot()
        candidates = snapshot.dead if attempt == "dead" else snapshot.usable
        for backend in candidates:
            if backend.id in tried:
                continue
            tried.add(backend.id)
            try:
                return backend, await _connect(connect, backend)
            except LocalResourceError:
                return None
            except BackendUnavailableError as exc:
                registry.record_failure(backend.id, str(exc))
                if attempt != "dead":
                    log.warning(
                        "switcher.proxy.backend_unavailable", backend=backend.id, reason=str(exc)
                    )
    return None


async def _connect(connect: Connector, backend: Backend) -> RelayStream:
    """Connect, waiting a little if we are out of descriptors.

    Running out is our shortage, not the agent's fault: connections in
    flight will finish and free some, so a client we accepted is better
    served late than failed at once.
    """
    deadline = trio.current_time() + _RESOURCE_WAIT
    while True:
        try:
            return await connect(backend)
        except LocalResourceError as exc:
            if trio.current_time() >= deadline:
                log.error("switcher.proxy.no_resources", reason=str(exc))
                raise
            await trio.sleep(_RESOURCE_RETRY)
