"""Health probing: keep the registry true to what is out there.

The prober's nursery holds the scanner task (:mod:`._scanner`), which scans
the agents dirs whenever asked, and the probe cycle, which probes every
candidate with a real REQUEST_IDENTITIES every ``interval`` seconds (time
spent in a cycle counts against the period; an overrun starts the next at
once). The probe cycle is the daemon's one periodic wake-up.

Rescans are asked for by the watcher (:mod:`._watcher`: inotify on the
directories the last scan looked into, so a new session is noticed within a
fraction of a second), by each probe cycle for directories that cannot be
watched, by the proxy when it runs out of backends (a "miss"), and by
SIGHUP and ``ctl refresh``. New candidates are probed at once, which is how
a new session gets preferred quickly. One probe per backend is in flight at
a time: a second asker waits for the first one's answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

import attrs
import structlog
import trio

from switcher.core._backend import Backend, Health, HealthChange, ProbeResult, Reconciled
from switcher.core._discovery import ScanResult, ScanSettings, host_hash
from switcher.core._loops import LOOP_REASON, LoopGuard
from switcher.core._peer import (
    BackendUnavailableError,
    LocalResourceError,
    describe_os_error,
    open_backend,
)
from switcher.core._protocol import (
    REQUEST_IDENTITIES_FRAME,
    FrameDecoder,
    FrameError,
    MessageType,
    identities_count,
    type_name,
)
from switcher.core._registry import Registry
from switcher.core._relaysocket import RelaySocket
from switcher.core._scanner import ScanFunction, Scanner, scan_in_thread
from switcher.core._watcher import Interest, Watcher

log = structlog.get_logger()

# The watcher's name for the prober's interests (the agents dirs).
_OWNER = "agents"


async def probe(
    path: str, *, refuse_pid: int | None, loops: LoopGuard | None = None
) -> ProbeResult:
    """Ask a backend for its identities; unbounded, the caller sets the timeout.

    With ``loops``, first check that it does not lead back to us (every
    probe: a loop can appear or go).
    """
    started = time.perf_counter()
    opened = await _open_checked(path, refuse_pid=refuse_pid, loops=loops)
    if isinstance(opened, ProbeResult):
        return opened
    async with opened as stream:
        try:
            await stream.send_all(REQUEST_IDENTITIES_FRAME)
            decoder = FrameDecoder()
            while (frame := decoder.next_frame()) is None:
                data = await stream.receive_some(64 * 1024)
                if not data:
                    return ProbeResult(Health.DEAD, error="closed without answering")
                decoder.feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__
            reason = describe_os_error(cause) if isinstance(cause, OSError) else "connection lost"
            return ProbeResult(Health.DEAD, error=reason)
        except FrameError as exc:
            return ProbeResult(Health.DEAD, error=f"bad reply: {exc}")
    if frame.type != MessageType.IDENTITIES_ANSWER:
        return ProbeResult(Health.DEAD, error=f"unexpected reply {type_name(frame.type)}")
    try:
        keys = identities_count(frame)
    except FrameError as exc:
        return ProbeResult(Health.DEAD, error=f"bad reply: {exc}")
    return ProbeResult(
        Health.HEALTHY,
        latency=time.perf_counter() - started,
        key_count=keys,
        # It answered on a connection that passed the check (or hung up on
        # the check, which a loop through us never does): it leads elsewhere.
        loop_clear=True if loops is not None else None,
    )


async def _open_checked(
    path: str, *, refuse_pid: int | None, loops: LoopGuard | None
) -> RelaySocket | ProbeResult:
    """A connection to the agent at ``path`` that does not lead back to us, or the verdict."""
    try:
        stream = await open_backend(path, refuse_pid=refuse_pid)
    except BackendUnavailableError as exc:
        return ProbeResult(Health.DEAD, error=str(exc))
    if loops is None:
        return stream
    try:
        looped = await loops.check(stream, path)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # It hung up on a request it did not know, which a loop through us
        # never does (we answer our own): ask on a new connection.
        await stream.aclose()
        return await _open_checked(path, refuse_pid=refuse_pid, loops=None)
    except FrameError as exc:
        await stream.aclose()
        return ProbeResult(Health.DEAD, error=f"bad reply: {exc}")
    except BaseException:
        await stream.aclose()
        raise
    if looped:
        await stream.aclose()
        return ProbeResult(Health.LOOP, error=LOOP_REASON, loop_clear=False)
    return stream


# How the prober asks one agent how it is: a real connection by default;
# tests script it in virtual time.
ProbeFunction = Callable[..., Awaitable[ProbeResult]]


@attrs.frozen
class RefreshReport:
    """What one rescan-and-probe changed."""

    added: tuple[Backend, ...]
    removed: tuple[Backend, ...]
    health_changes: tuple[HealthChange, ...]


@attrs.define(eq=False)
class _Probe:
    """A probe in flight: whoever else wants that backend probed waits for this one."""

    done: trio.Event = attrs.Factory(trio.Event)
    change: HealthChange | None = None


@attrs.define(eq=False)
class Prober:
    registry: Registry
    _settings: ScanSettings
    # How often, and how patiently: no defaults here, they are Config's. A
    # probe unanswered in time marks its agent slow, not dead: ssh-agent is
    # single-threaded, so a prompt or a key touch elsewhere stalls it too.
    interval: float = attrs.field(kw_only=True)
    probe_timeout: float = attrs.field(kw_only=True)
    refuse_pid: int | None = attrs.Factory(os.getpid)
    # Without inotify (the default here; the daemon passes a real one) every
    # probe cycle rescans.
    watcher: Watcher = attrs.Factory(lambda: Watcher(None))
    scan_dirs: ScanFunction = scan_in_thread
    probe_path: ProbeFunction = probe
    scanner: Scanner = attrs.field(init=False)
    _probing: dict[str, _Probe] = attrs.field(init=False, factory=dict)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.scanner = Scanner(
            self.registry, self._settings, self.scan_dirs, on_scanned=self._scanned
        )

    # -- scanning (the scanner task does it; these ask) ----------------------

    def _scanned(self, result: ScanResult, reconciled: Reconciled) -> None:
        interests = [Interest(path, prefixes) for path, prefixes in result.watched]
        self.watcher.follow(_OWNER, interests, self._ask_for_scan)
        # New candidates are probed at once: that is how a new session gets
        # preferred quickly (and a restarted local agent is seen healthy).
        # Nobody waits here: a slow one takes seconds.
        fresh = reconciled.added + reconciled.returned
        if fresh and self._nursery is not None:
            self._nursery.start_soon(self._probe_all, fresh)

    def _ask_for_scan(self) -> None:
        self.scanner.request()

    async def rescan(self) -> RefreshReport:
        """Scan the dirs now, update the registry, and probe (and wait for) what is new."""
        reconciled = await self.scanner.scan()
        changes = await self._probe_all(reconciled.added) if reconciled.added else []
        return RefreshReport(reconciled.added, reconciled.removed, tuple(changes))

    async def rescan_for_miss(self) -> None:
        """The proxy's hook when it runs out of backends: return as soon as the
        registry holds what is there now; new candidates are probed in the
        background (the proxy can try an unknown backend directly).
        """
        await self.scanner.scan()

    async def refresh(self) -> RefreshReport:
        """Rescan and probe every backend now; wait for it all."""
        report = await self.rescan()
        already = {b.id for b in report.added}
        rest = [b for b in self.registry.snapshot().backends if b.id not in already]
        changes = list(report.health_changes) + await self._probe_all(rest)
        return attrs.evolve(report, health_changes=tuple(changes))

    # -- probing -------------------------------------------------------------

    async def _probe_all(self, backends: list[Backend] | tuple[Backend, ...]) -> list[HealthChange]:
        """Probe concurrently: one slow backend never delays the others."""
        changes: list[HealthChange] = []

        async def one(backend: Backend) -> None:
            change = await self._probe_one(backend)
            if change is not None:
                changes.append(change)

        async with trio.open_nursery() as nursery:
            for backend in backends:
                nursery.start_soon(one, backend)
        return changes

    async def _probe_one(self, backend: Backend) -> HealthChange | None:
        """Probe one backend, or wait for the probe of it already in flight."""
        running = self._probing.get(backend.id)
        if running is not None:
            await running.done.wait()
            return running.change
        running = self._probing[backend.id] = _Probe()
        try:
            running.change = await self._probe_now(backend)
        finally:
            del self._probing[backend.id]
            running.done.set()
        return running.change

    async def _probe_now(self, backend: Backend) -> HealthChange | None:
        if backend.refused is not None:
            return None  # a local agent's path failed a safety check: never connect
        with trio.move_on_after(self.probe_timeout) as scope:
            try:
                result = await self.probe_path(backend.path, refuse_pid=self.refuse_pid)
            except LocalResourceError as exc:
                # Our own shortage says nothing about the backend: keep its health.
                log.warning("switcher.prober.no_resources", backend=backend.id, reason=str(exc))
                return None
        if scope.cancelled_caught:
            result = ProbeResult(
                Health.SLOW,
                latency=self.probe_timeout,
                error=f"no answer within {self.probe_timeout:g} s",
            )
        return self.registry.record_probe(backend.id, result)

    # -- the service ---------------------------------------------------------

    async def _periodic(self) -> None:
        # serve() probed everything once already; from here on, every period.
        deadline = trio.current_time() + self.interval
        while True:
            await trio.sleep_until(deadline)
            deadline = trio.current_time() + self.interval
            # Directories that cannot be watched are looked at now (the
            # scanner rescans in the background; what it finds is probed at
            # once); everything already known is probed here.
            self.watcher.poll()
            await self._probe_all(self.registry.snapshot().backends)

    async def serve(
        self, *, task_status: trio.TaskStatus[Prober] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Scan once, report ready, then keep probing until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # Ready as soon as the registry holds what is there; probing the
            # candidates must not delay the socket (a slow one takes seconds).
            await nursery.start(self.scanner.run)
            task_status.started(self)
            nursery.start_soon(self._periodic)


def scan_settings(
    agents_dirs: tuple[str, ...],
    *,
    exclude: frozenset[tuple[int, int]] = frozenset(),
    local_agents: tuple[str, ...] = (),
) -> ScanSettings:
    """Discovery settings for this process: our uid and this host's hash."""
    return ScanSettings(
        agents_dirs=agents_dirs,
        uid=os.getuid(),
        host_hash=host_hash(),
        exclude=exclude,
        local_agents=local_agents,
    )
