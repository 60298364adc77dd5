"""The one shared state: every candidate backend, its health, and the ranking.

The values it holds and hands out (backends, snapshots, health) are in
:mod:`._backend`; this module is the state and its mutations.

Mutations are plain synchronous methods with no ``await`` inside, so trio's
cooperative scheduling makes each one atomic without locks. Readers take a
frozen :class:`Snapshot`; waiting for change is :meth:`Registry.wait_changed`.

The registry logs its own changes (a backend added or removed, a change of
health), whoever caused them: one place per event, so the prober and the
relay cannot disagree about what a health change looks like in the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import attrs
import structlog
import trio

from switcher.core._backend import (
    Backend,
    Cause,
    Health,
    HealthChange,
    Kind,
    ProbeResult,
    Reconciled,
    Snapshot,
    backend_id,
    local_backend_id,
    rank_key,
)
from switcher.core._discovery import Candidate

log = structlog.get_logger()

# The values live in _backend; they are named here too for the modules that
# import them with the registry.
__all__ = [
    "Backend",
    "Cause",
    "Health",
    "HealthChange",
    "Kind",
    "ProbeResult",
    "Reconciled",
    "Registry",
    "Snapshot",
    "backend_id",
    "local_backend_id",
    "rank_key",
]


class Registry:
    """Candidate backends keyed by path, shared by the proxy, prober and control."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._backends: dict[str, Backend] = {}
        self._pinned: str | None = None
        self._version = 0
        self._changed = trio.Event()
        self._paths_by_id: dict[str, str] = {}
        # The current snapshot, built on demand and kept until the next change.
        self._snapshot: Snapshot | None = None
        # Whether any local agent is held, and the id of the one chosen now
        # (None while the choice is forwarded, or there is none): to log
        # when the choice falls back to a local agent and when it leaves.
        self._has_local = False
        self._fallback: str | None = None

    # -- reading ---------------------------------------------------------

    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            ranked = sorted(self._backends.values(), key=lambda b: rank_key(b, self._pinned))
            self._snapshot = Snapshot(tuple(ranked), self._pinned, self._version)
        return self._snapshot

    def get(self, backend_id: str) -> Backend | None:
        path = self._paths_by_id.get(backend_id)
        return None if path is None else self._backends[path]

    @property
    def version(self) -> int:
        return self._version

    async def wait_changed(self, since: int) -> int:
        """Wait until the registry's version differs from ``since``; return the new one."""
        while self._version == since:
            await self._changed.wait()
        return self._version

    # -- mutating (synchronous: atomic under trio) -----------------------

    def _touch(self) -> None:
        self._version += 1
        self._snapshot = None
        self._changed.set()
        self._changed = trio.Event()

    def reconcile(self, candidates: Iterable[Candidate]) -> Reconciled:
        """Make the registry hold exactly these candidates, keeping known state.

        A path whose inode changed is a different socket (a new session that
        reused the name): the old entry goes, a fresh one comes. Local agents
        never go: their entry follows their socket (see ``Backend.with_socket``).
        """
        fresh = {c.path: c for c in candidates}
        removed = [
            b
            for path, b in self._backends.items()
            if b.kind is Kind.FORWARDED
            and (path not in fresh or (fresh[path].dev, fresh[path].ino) != (b.dev, b.ino))
        ]
        for backend in removed:
            del self._backends[backend.path]
            del self._paths_by_id[backend.id]
            if backend.id == self._pinned:
                self._pinned = None  # the pin ends when its session goes
        added = []
        changes = []
        for path, candidate in fresh.items():
            known = self._backends.get(path)
            if known is None:
                backend = Backend.from_candidate(candidate)
                self._backends[path] = backend
                self._paths_by_id[backend.id] = path
                added.append(backend)
            elif known.kind is Kind.LOCAL:
                backend = known.with_socket(candidate)
                if backend != known:
                    self._backends[path] = backend
                    changes.append((known, backend))
        if added or removed or changes:
            self._has_local = self._has_local or any(b.kind is Kind.LOCAL for b in added)
            self._touch()
        _log_reconciled(added, removed, changes)
        self._note_choice()
        returned = tuple(new for old, new in changes if new.health is Health.UNKNOWN)
        return Reconciled(tuple(added), tuple(removed), returned)

    def _replace(self, new: Backend) -> None:
        self._backends[new.path] = new
        self._touch()

    def record_probe(self, backend_id: str, result: ProbeResult) -> HealthChange | None:
        """Store a probe's outcome; return the health change, if any."""
        backend = self.get(backend_id)
        if backend is None:
            return None  # its socket vanished while the probe ran
        now = self._clock()
        healthy = result.health is Health.HEALTHY
        new = attrs.evolve(
            backend,
            health=result.health,
            last_probe=now,
            probe_latency=result.latency,
            last_success=now if healthy else backend.last_success,
            last_error=result.error if result.error is not None else backend.last_error,
            key_count=result.key_count if result.key_count is not None else backend.key_count,
            loop_clear=backend.loop_clear if result.loop_clear is None else result.loop_clear,
        )
        self._replace(new)
        change = _health_change(backend, new, Cause.PROBE)
        self._note_choice()
        return change

    def record_traffic(self, backend_id: str, *, served: int, failed: int) -> HealthChange | None:
        """Count requests a connection relayed; any answer is a success.

        An answer from a backend judged dead proves it alive again: it goes
        back to healthy without waiting for the next probe.
        """
        backend = self.get(backend_id)
        if backend is None or (served == 0 and failed == 0):
            return None
        revived = served > 0 and backend.health is Health.DEAD
        new = attrs.evolve(
            backend,
            served=backend.served + served,
            failed=backend.failed + failed,
            last_success=self._clock() if served else backend.last_success,
            health=Health.HEALTHY if revived else backend.health,
        )
        if revived or not self._count_in_place(backend, new):
            self._replace(new)
        change = _health_change(backend, new, Cause.CLIENT_ANSWERED)
        if change is not None:
            self._note_choice()
        return change

    def _count_in_place(self, old: Backend, new: Backend) -> bool:
        """Update traffic counters without re-ranking, when that cannot move ``old``.

        Every relayed connection updates its backend's counters; re-sorting
        for each would cost more than the relay itself on a crowded host.
        Counters never affect the rank and last_success only breaks ties
        between sessions of equal health and age, so unless ``old`` has such
        a twin, its place stays, and the snapshot is patched in place. This
        is no change a watcher cares about: the version stays.
        """
        self._backends[new.path] = new
        snapshot = self._snapshot
        if snapshot is None:
            return True
        if any(
            b.health is old.health and b.appeared == old.appeared and b is not old
            for b in snapshot.backends
        ):
            return False
        self._snapshot = attrs.evolve(
            snapshot, backends=tuple(new if b is old else b for b in snapshot.backends)
        )
        return True

    def record_loop_clear(self, backend_id: str) -> None:
        """A loop check of this backend came back clear (the relay checked it itself)."""
        backend = self.get(backend_id)
        if backend is not None and not backend.loop_clear:
            self._replace(attrs.evolve(backend, loop_clear=True))

    def record_failure(self, backend_id: str, error: str) -> HealthChange | None:
        """The proxy could not use this backend: rank it last until a probe says otherwise."""
        backend = self.get(backend_id)
        if backend is None:
            return None
        new = attrs.evolve(backend, health=Health.DEAD, last_error=error, failed=backend.failed + 1)
        self._replace(new)
        change = _health_change(backend, new, Cause.RELAY_FAILED)
        self._note_choice()
        return change

    def pin(self, backend_id: str | None) -> None:
        """Prefer one backend while it is usable; ``None`` clears the pin."""
        if backend_id is not None and self.get(backend_id) is None:
            raise KeyError(backend_id)
        if backend_id != self._pinned:
            self._pinned = backend_id
            self._touch()
            self._note_choice()

    def _note_choice(self) -> None:
        """Log when the choice falls back to a local agent, and when it leaves them."""
        if not self._has_local:
            return  # no local agent: nothing to fall back to, and no sort to pay for
        choice = self.snapshot().choice
        local = choice if choice is not None and choice.kind is Kind.LOCAL else None
        if local is not None and self._fallback is None:
            log.info(
                "switcher.registry.fallback_to_local",
                backend=local.id,
                path=local.path,
                cause="pin" if local.id == self._pinned else "no_forwarded_agent",
            )
        elif local is None and self._fallback is not None:
            log.info(
                "switcher.registry.fallback_ended",
                backend=None if choice is None else choice.id,
                path=None if choice is None else choice.path,
                cause="no_agent" if choice is None else "forwarded_agent",
            )
        self._fallback = None if local is None else local.id


def _log_reconciled(
    added: list[Backend], removed: list[Backend], changes: list[tuple[Backend, Backend]]
) -> None:
    for backend in added:
        log.info(
            "switcher.registry.backend_added",
            backend=backend.id,
            path=backend.path,
            layout=backend.layout.value,
        )
    for backend in removed:
        log.info("switcher.registry.backend_removed", backend=backend.id, path=backend.path)
    for old, new in changes:
        _health_change(old, new, Cause.SCAN)


def _health_change(old: Backend, new: Backend, cause: Cause) -> HealthChange | None:
    """The change from ``old`` to ``new``, if their health differs; logged here, once."""
    if new.health is old.health:
        return None
    probed = cause is Cause.PROBE
    log.info(
        "switcher.registry.health_changed",
        backend=new.id,
        path=new.path,
        previous=old.health.value,
        health=new.health.value,
        cause=cause.value,
        latency_ms=round(new.probe_latency * 1000, 3)
        if probed and new.probe_latency is not None
        else None,
        keys=new.key_count if probed else None,
        reason=new.last_error if new.health is not Health.HEALTHY else None,
    )
    return HealthChange(new, old.health)
