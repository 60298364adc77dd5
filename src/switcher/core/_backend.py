"""The values the registry holds and hands out: agents, their health, their rank.

All frozen: a :class:`Snapshot` can be read anywhere, kept, and compared,
and never changes under its reader. The registry (:mod:`._registry`) is the
one place that makes new ones.
"""

from __future__ import annotations

import enum
import functools
import hashlib

import attrs

from switcher.core._discovery import Candidate, Layout


class Health(enum.Enum):
    UNKNOWN = "unknown"  # found, not probed yet
    HEALTHY = "healthy"  # answered a probe in time
    SLOW = "slow"  # accepted but did not answer in time (touch or confirm prompt?)
    DEAD = "dead"  # refused, reset, closed, or spoke garbage
    LOOP = "loop"  # leads back to switcher itself (see _loops): never chosen


class Cause(enum.Enum):
    """What told the registry an agent's health changed (the log's ``cause``)."""

    PROBE = "probe"  # the prober asked it for its identities
    CLIENT_ANSWERED = "client_answered"  # it answered a relayed request
    RELAY_FAILED = "relay_failed"  # the relay could not connect to it, or lost it
    SCAN = "scan"  # a local agent's socket went missing, came back, or failed a safety check


class Kind(enum.Enum):
    """Where an agent comes from (``ctl list``'s KIND)."""

    FORWARDED = "forwarded"  # sshd made it for a session
    LOCAL = "local"  # named with --local-agent: the last resort


_PINNABLE = frozenset({Health.HEALTHY, Health.SLOW})
_UNUSABLE = frozenset({Health.DEAD, Health.LOOP})

# Rank order between (kind, health): a forwarded session that works wins,
# since it is the person's own agent on the machine in front of them; a
# working local agent comes next, before anything not yet heard from; then
# the rest, forwarded before local at each step.
_TIER = {
    (Kind.FORWARDED, Health.HEALTHY): 0,
    (Kind.FORWARDED, Health.SLOW): 1,
    (Kind.LOCAL, Health.HEALTHY): 2,
    (Kind.LOCAL, Health.SLOW): 3,
    (Kind.FORWARDED, Health.UNKNOWN): 4,
    (Kind.LOCAL, Health.UNKNOWN): 5,
    (Kind.FORWARDED, Health.DEAD): 6,
    (Kind.LOCAL, Health.DEAD): 7,
    (Kind.FORWARDED, Health.LOOP): 8,
    (Kind.LOCAL, Health.LOOP): 9,
}


def backend_id(path: str, dev: int, ino: int) -> str:
    """A short id, stable for the life of one socket (and across daemon restarts)."""
    return hashlib.blake2b(f"{path}\0{dev}:{ino}".encode(), digest_size=4).hexdigest()


def local_backend_id(path: str) -> str:
    """A local agent's id: one per path, kept when its socket goes and comes back."""
    return hashlib.blake2b(f"local\0{path}".encode(), digest_size=4).hexdigest()


@attrs.frozen
class Backend:
    """Everything known about one candidate agent socket, at one moment."""

    id: str
    path: str
    layout: Layout
    dev: int
    ino: int
    appeared: float  # wall-clock seconds: the socket's ctime (the session's start)
    health: Health = Health.UNKNOWN
    last_probe: float | None = None
    probe_latency: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    key_count: int | None = None
    served: int = 0
    failed: int = 0
    order: int = 0  # a local agent's place among --local-agent flags
    # Why switcher will not connect to it (a local agent whose path failed
    # a safety check): it stays dead, and is neither probed nor tried.
    refused: str | None = None
    # Whether a loop check of it has come back clear (it does not lead back
    # to switcher). Only a completed check says so: a probe that timed out
    # during its check leaves this as it was, so the relay checks first.
    loop_clear: bool = False

    @property
    def kind(self) -> Kind:
        return Kind.LOCAL if self.layout is Layout.LOCAL else Kind.FORWARDED

    @classmethod
    def from_candidate(cls, candidate: Candidate) -> Backend:
        local = candidate.layout is Layout.LOCAL
        backend = cls(
            id=local_backend_id(candidate.path)
            if local
            else backend_id(candidate.path, candidate.dev, candidate.ino),
            path=candidate.path,
            layout=candidate.layout,
            dev=candidate.dev,
            ino=candidate.ino,
            appeared=candidate.ctime,
            order=candidate.order,
        )
        return backend.with_socket(candidate) if local else backend

    def with_socket(self, candidate: Candidate) -> Backend:
        """A local agent after a scan found ``candidate`` at its path.

        The scan decides its health only when the socket is missing or
        refused (dead), or when a dead one's socket has come back or been
        replaced (unknown: worth trying again). Otherwise it stays as probes
        and clients left it: they reach whatever socket is at the path.
        """
        health, error = self.health, self.last_error
        if candidate.refused is not None:
            health, error = Health.DEAD, candidate.refused
        elif candidate.missing:
            health, error = Health.DEAD, "no socket at this path"
        elif health is Health.DEAD and (
            self.refused is not None or (candidate.dev, candidate.ino) != (self.dev, self.ino)
        ):
            health = Health.UNKNOWN
        return attrs.evolve(
            self,
            dev=candidate.dev,
            ino=candidate.ino,
            appeared=candidate.ctime,
            refused=candidate.refused,
            health=health,
            last_error=error,
        )


def rank_key(backend: Backend, pinned: str | None) -> tuple[int, int, int, float, float]:
    """Sort key: a usable pin first, then by kind and health (see ``_TIER``), then
    local agents in the order given and forwarded ones newest session first,
    then latest success.
    """
    pin = 0 if backend.id == pinned and backend.health in _PINNABLE else 1
    last_success = backend.last_success if backend.last_success is not None else float("-inf")
    tier = _TIER[backend.kind, backend.health]
    return (pin, tier, backend.order, -backend.appeared, -last_success)


@attrs.frozen
class Snapshot:
    """The registry at one moment, backends in rank order."""

    backends: tuple[Backend, ...]
    pinned: str | None
    version: int

    # Computed once per snapshot: the relay asks for them on every connection,
    # and the registry hands out the same snapshot until something changes.
    @functools.cached_property
    def usable(self) -> tuple[Backend, ...]:
        """Backends a new connection may try, best first (everything not dead or a loop)."""
        return tuple(b for b in self.backends if b.health not in _UNUSABLE)

    @property
    def choice(self) -> Backend | None:
        """The backend a new connection would use now."""
        usable = self.usable
        return usable[0] if usable else None

    @functools.cached_property
    def dead(self) -> tuple[Backend, ...]:
        """Backends judged dead, best first: a last resort before failing a client.

        A local agent whose socket is missing is here too: a socket-activated
        agent may start on the connect. One refused by a safety check is not.
        """
        return tuple(b for b in self.backends if b.health is Health.DEAD and b.refused is None)

    def find(self, backend_id: str) -> Backend | None:
        for backend in self.backends:
            if backend.id == backend_id:
                return backend
        return None


@attrs.frozen
class Reconciled:
    added: tuple[Backend, ...]
    removed: tuple[Backend, ...]
    # Local agents whose socket the scan found back or replaced: unknown
    # again, worth probing at once like a new session.
    returned: tuple[Backend, ...] = ()


@attrs.frozen
class HealthChange:
    backend: Backend  # after the change
    previous: Health


@attrs.frozen
class ProbeResult:
    health: Health
    latency: float | None = None
    key_count: int | None = None
    error: str | None = None
    # What the probe's loop check said: True clear, False a loop, None not
    # known (no check, or the probe ended before it completed).
    loop_clear: bool | None = None
