"""Reaching an agent for a client: the best one that will take the connection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
import trio

from switcher.core._loops import LOOP_REASON, LoopGuard
from switcher.core._peer import BackendUnavailableError, LocalResourceError, open_backend
from switcher.core._protocol import FrameError
from switcher.core._registry import Backend, Health, ProbeResult, Registry
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
    registry: Registry,
    connect: Connector,
    rescan: Rescan,
    tried: set[str],
    loops: LoopGuard | None = None,
    *,
    binding: bool = False,
    preferred: str | None = None,
) -> tuple[Backend, RelayStream] | None:
    """Connect to the best agent not tried yet; None if none would take us.

    In rank order: every usable agent; on a miss, the same after a rescan (a
    session may have appeared since the last one); and last, before telling
    the client FAILURE, the ones judged dead, since a judgement can be stale
    (a socket probed between sshd's bind() and listen() looks dead until the
    next probe), with any session that appeared meanwhile. The ranking is
    read afresh for every candidate, never from a list made before a wait.

    With ``loops``, an agent nobody has probed yet might lead back here: a
    client waits for a check of it in flight, or checks it on the new
    connection, before its requests go there. ``binding`` (the client's
    first request is session-bind) skips such agents instead: see
    ``_vetted``. ``preferred`` (session affinity's choice) goes before the
    other usable agents.
    """
    for attempt in ("usable", "rescanned", "dead"):
        if attempt == "rescanned":
            await rescan()
        skipped: set[str] = set()  # passed over in this attempt, not tried
        # The ranking is read again before each candidate: waiting for a loop
        # check or a connect takes time, and a session that appeared meanwhile
        # must be seen now, not after the one we waited for has gone too.
        while (candidate := _next(registry, attempt, preferred, tried | skipped)) is not None:
            backend = await _vetted(loops, registry, candidate, binding=binding)
            if backend is None:
                skipped.add(candidate.id)
                continue
            tried.add(backend.id)
            try:
                upstream = await _connect(connect, backend)
            except LocalResourceError:
                return None
            except BackendUnavailableError as exc:
                registry.record_failure(backend.id, str(exc))
                if attempt != "dead":
                    log.warning(
                        "switcher.proxy.backend_unavailable", backend=backend.id, reason=str(exc)
                    )
                continue
            if await _leads_elsewhere(loops, registry, backend, upstream):
                return backend, upstream
    return None


async def _vetted(
    loops: LoopGuard | None, registry: Registry, backend: Backend, *, binding: bool
) -> Backend | None:
    """``backend`` as it stands once any loop check of it is done; None to skip it.

    Only an agent whose loop check never came back clear can be a loop we
    do not know of: one nobody has probed yet, or one whose probes ran out
    of time before their check answered. A session-bind never goes to one: it comes from
    an ``ssh`` that waits for the answer before it serves any channel, and if
    this agent is that ssh's own forwarded socket, checking it (or waiting
    for a check of it) would wait on itself. That is the one request a loop
    makes wait like that; every other request may wait for the verdict,
    which the chain delivers once its binds are answered.
    """
    if loops is None or backend.loop_clear:
        return backend
    if binding:
        return None
    await loops.wait_checked(backend.path)
    current = registry.get(backend.id)
    if current is None or current.health is Health.LOOP:
        return None
    return current


async def _leads_elsewhere(
    loops: LoopGuard | None, registry: Registry, backend: Backend, upstream: RelayStream
) -> bool:
    """Check a fresh connection to an agent not yet known to be clear, before relaying.

    An agent whose last completed check came back clear is not checked again
    here; one whose probes timed out before their check answered is (its
    check waits no longer than its requests would).
    """
    if loops is None or backend.loop_clear:
        return True
    try:
        looped = await loops.check(upstream, backend.path)
    except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError):
        looped = None  # it hung up on (or garbled) a request it did not know: not usable now
    except BaseException:
        with trio.CancelScope(shield=True):
            await upstream.aclose()
        raise
    if looped is False:
        registry.record_loop_clear(backend.id)
        return True
    with trio.CancelScope(shield=True):
        await upstream.aclose()
    if looped:
        registry.record_probe(backend.id, ProbeResult(Health.LOOP, error=LOOP_REASON))
    return False


def _next(
    registry: Registry, attempt: str, preferred: str | None, passed: set[str]
) -> Backend | None:
    """The best agent of this attempt's pool that has not been passed over yet."""
    snapshot = registry.snapshot()
    pool = _first(snapshot.usable, preferred)
    if attempt == "dead":
        # The last resort: the dead, and any session that appeared since.
        pool += snapshot.dead
    return next((b for b in pool if b.id not in passed), None)


def _first(backends: tuple[Backend, ...], preferred: str | None) -> tuple[Backend, ...]:
    """``backends`` with the one whose id is ``preferred`` moved to the front."""
    if preferred is None or not backends or backends[0].id == preferred:
        return backends
    chosen = tuple(b for b in backends if b.id == preferred)
    return chosen + tuple(b for b in backends if b.id != preferred)


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
