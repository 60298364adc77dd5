"""Session affinity: which agent the person at a client's terminal brought along.

The rule, for a client process:

1. Inside tmux: the session of the tmux client most recently active among
   those attached to the pane's tmux session (else among all of that
   server's clients).
2. Started in an SSH session directly: that session.
3. Otherwise, or when nothing could be determined: the ranking.

A process belongs to the session whose forwarded ``SSH_AUTH_SOCK`` it (or
its nearest ancestor) started with, or, for OpenSSH before 10.1, whose
socket ``agent.<pid>`` names its parent: sshd's session process, which is
the login shell's parent. A chosen agent counts only while it is usable
(healthy or slow, as a pin); a pin beats everything.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence

import attrs
import trio

from switcher.core._backend import Backend, Health, Kind, Snapshot
from switcher.core._discovery import Layout
from switcher.core._known import KnownProcesses
from switcher.core._proctree import Chain, Process, ProcessTable, Stop, clock_ticks
from switcher.core._tmux import CACHE_LIFETIME, TmuxClient, TmuxQuery

# The whole lookup (reading /proc, asking tmux) gets this long before the
# connection goes ahead with the ranking: it is a preference, not worth a wait.
LOOKUP_TIMEOUT = 2.0

# tmux reports client_created in whole seconds: a client's process may have
# started up to this long before that (same second, rounded down, a slow exec).
_CREATED_SLACK = 2.0

# A client process's decision stands this long for its next connections, as
# long as the registry does not change: as long as tmux's own answer is
# trusted. A process that opens many connections (a pool of workers, a
# program using an agent library) reads its ancestry once per this period,
# not once per connection; each new process (each `ssh`) still reads it.
# A pid reused within that time (by a process of a uid allowed to connect)
# gets the previous process's preference among the usable agents: as stale
# as tmux's cached answer may be, and no more.
DECISION_LIFETIME = CACHE_LIFETIME
# Decisions remembered at most (expired ones are dropped first).
_REMEMBERED_MAX = 1024

_ELIGIBLE = frozenset({Health.HEALTHY, Health.SLOW})

_LEGACY_SOCKET_PREFIX = "agent."


class ChosenBy(enum.Enum):
    """How a connection's agent was chosen (the ``chosen_by`` log field)."""

    TMUX_CLIENT = "tmux_client"
    SESSION = "session"
    PIN = "pin"
    RANK = "rank"


@attrs.frozen
class Decision:
    """An agent to prefer (None: the ranking decides), how it was found, and each step."""

    chosen_by: ChosenBy
    backend: Backend | None = None
    tmux_client: str | None = None  # the tty of the tmux client that decided
    sshd_pid: int | None = None  # the pid of the chosen session's sshd, when known
    steps: tuple[str, ...] = ()

    def log_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"chosen_by": self.chosen_by.value}
        if self.tmux_client is not None:
            fields["tmux_client"] = self.tmux_client
        if self.sshd_pid is not None:
            fields["session_sshd_pid"] = self.sshd_pid
        return fields


RANK = Decision(ChosenBy.RANK)


def pinned_usable(snapshot: Snapshot) -> Backend | None:
    """The pinned agent, while it is usable (healthy or slow)."""
    if snapshot.pinned is None:
        return None
    pinned = snapshot.find(snapshot.pinned)
    return pinned if pinned is not None and pinned.health in _ELIGIBLE else None


def without_lookup(snapshot: Snapshot) -> Decision:
    """The decision with no process looked at: the pin while usable, else the ranking."""
    pinned = pinned_usable(snapshot)
    if pinned is None:
        return RANK
    return Decision(ChosenBy.PIN, pinned, steps=(f"pinned: {_describe_agent(pinned)}",))


@attrs.frozen
class SessionMatch:
    """The agent a process's session forwarded, and the evidence."""

    backend: Backend
    sshd_pid: int | None
    via_pid: int  # the process whose environment or parent named the agent


def legacy_sshd_pid(backend: Backend) -> int | None:
    """The pid in an OpenSSH-before-10.1 socket name, ``agent.<sshd pid>``."""
    if backend.layout is not Layout.TMP:
        return None
    name = os.path.basename(backend.path)
    digits = name.removeprefix(_LEGACY_SOCKET_PREFIX)
    if digits == name or not digits.isdigit():
        return None
    pid = int(digits)
    return pid if pid > 1 else None  # pid 1 adopts orphans: it is nobody's sshd


def _same_socket(path: str, backends: Sequence[Backend]) -> Backend | None:
    """A backend at another spelling of ``path`` (a symlinked home, a trailing slash)."""
    name = os.path.basename(path)
    alike = [b for b in backends if os.path.basename(b.path) == name]
    if not alike:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return next((b for b in alike if (b.dev, b.ino) == (st.st_dev, st.st_ino)), None)


def match_session(chain: Chain, backends: Sequence[Backend]) -> SessionMatch | None:
    """The session ``chain``'s first process belongs to, nearest evidence first.

    The walk stops at a tmux server: what lies beyond is the session that
    started the server, not the one the person is typing in.
    """
    backends = [b for b in backends if b.kind is Kind.FORWARDED]  # a local agent is no session
    by_path = {b.path: b for b in backends}
    by_sshd = {pid: b for b in backends if (pid := legacy_sshd_pid(b)) is not None}
    last = len(chain.processes) - 1
    for index, process in enumerate(chain.processes):
        if process.is_tmux_server:
            return None
        if process.auth_sock:
            backend = by_path.get(process.auth_sock) or _same_socket(process.auth_sock, backends)
            if backend is not None:
                sshd_pid = legacy_sshd_pid(backend)
                if sshd_pid is None and index == last and chain.stop is Stop.NOT_OURS:
                    sshd_pid = process.ppid  # the login shell's parent: the session's sshd
                return SessionMatch(backend, sshd_pid, process.pid)
        backend = by_sshd.get(process.ppid)
        if backend is not None:
            return SessionMatch(backend, process.ppid, process.pid)
    return None


@attrs.frozen
class TmuxPlace:
    """Where a process sits in tmux: the server's socket and its pane."""

    socket: str | None
    pane_pids: tuple[int, ...]
    pane_id: str | None


def tmux_place(chain: Chain) -> TmuxPlace | None:
    """If ``chain`` runs inside tmux (a tmux server above it, or ``TMUX`` set), where."""
    processes = chain.processes
    server = next((i for i, p in enumerate(processes) if p.is_tmux_server), None)
    below = processes[:server] if server is not None else processes
    marked = next((p for p in below if p.tmux), None)
    if server is None and marked is None:
        return None
    pane_pids = (processes[server - 1].pid,) if server else ()
    if marked is None:
        return TmuxPlace(None, pane_pids, None)
    return TmuxPlace(marked.tmux_socket, pane_pids, marked.tmux_pane)


def _describe(process: Process) -> str:
    return f"process {process.pid} ({process.comm})"


def _describe_agent(backend: Backend) -> str:
    return f"agent {backend.id} ({backend.path}, {backend.health.value})"


@attrs.define(eq=False)
class Affinity:
    """Decides, per client process, which agent to prefer."""

    processes: ProcessTable
    tmux: TmuxQuery = attrs.Factory(TmuxQuery)
    timeout: float = LOOKUP_TIMEOUT
    lifetime: float = DECISION_LIFETIME
    # Recent decisions: pid -> (when, the snapshot's version, the decision).
    _remembered: dict[int, tuple[float, int, Decision]] = attrs.Factory(dict)
    # Ancestors read before, each checked to be the same process when used.
    known: KnownProcesses = attrs.Factory(
        lambda self: KnownProcesses(self.processes), takes_self=True
    )

    @classmethod
    def for_own_processes(cls) -> Affinity:
        """Affinity over the real /proc, reading only this user's processes."""
        return cls(ProcessTable(uid=os.getuid()))

    async def decide(self, pid: int, snapshot: Snapshot, *, fresh: bool = False) -> Decision:
        """Apply the rule to process ``pid``; ``fresh`` asks tmux again instead of its cache."""
        # Affinity follows sessions: a local agent is nobody's session.
        eligible = [
            b for b in snapshot.usable if b.health in _ELIGIBLE and b.kind is Kind.FORWARDED
        ]
        if len(eligible) < 2 or pinned_usable(snapshot):
            plain = without_lookup(snapshot)
            if plain.chosen_by is ChosenBy.PIN:
                return plain
            return attrs.evolve(plain, steps=("fewer than two usable agents: the ranking decides",))
        now = trio.current_time()
        remembered = None if fresh else self._remembered.get(pid)
        if remembered is not None:
            when, version, known = remembered
            if version == snapshot.version and now - when < self.lifetime:
                return known
        steps: list[str] = []
        decision = None
        with trio.move_on_after(self.timeout):
            decision = await self._decide(pid, snapshot, eligible, steps, fresh=fresh)
        if decision is None:
            steps.append("the lookup took too long: the ranking decides")
            decision = RANK
        decided = attrs.evolve(decision, steps=tuple(steps))
        self._remember(pid, now, snapshot.version, decided)
        return decided

    def _remember(self, pid: int, now: float, version: int, decision: Decision) -> None:
        if len(self._remembered) >= _REMEMBERED_MAX:
            self._remembered = {
                p: entry for p, entry in self._remembered.items() if now - entry[0] < self.lifetime
            }
            if len(self._remembered) >= _REMEMBERED_MAX:
                self._remembered.clear()
        self._remembered[pid] = (now, version, decision)

    async def _decide(
        self,
        pid: int,
        snapshot: Snapshot,
        eligible: list[Backend],
        steps: list[str],
        *,
        fresh: bool,
    ) -> Decision:
        chain = await self._chain(pid, fresh=fresh)
        first = chain.processes[0] if chain.processes else None
        if first is None:
            steps.append(f"process {pid} is not yours or is gone: the ranking decides")
            return RANK
        ancestors = ", ".join(_describe(p) for p in chain.processes[1:]) or "none of yours"
        steps.append(f"{_describe(first)}; ancestors: {ancestors}; then {chain.stop.value}")
        place = tmux_place(chain)
        if place is not None:
            return await self._by_tmux(place, snapshot, eligible, steps, fresh=fresh)
        if first.sty:
            steps.append(
                "inside screen, which cannot say which client is active: using the session"
            )
        match = match_session(chain, snapshot.backends)
        if match is None:
            steps.append("no SSH session found among its ancestors: the ranking decides")
            return RANK
        steps.append(
            f"process {match.via_pid} belongs to the SSH session of "
            + (f"sshd {match.sshd_pid}" if match.sshd_pid is not None else "an unknown sshd")
            + f": {_describe_agent(match.backend)}"
        )
        if match.backend not in eligible:
            steps.append("that agent is not usable: the ranking decides")
            return RANK
        return Decision(ChosenBy.SESSION, match.backend, sshd_pid=match.sshd_pid)

    async def _chain(self, pid: int, *, fresh: bool) -> Chain:
        if fresh:  # `ctl why`: everything read afresh
            return await trio.to_thread.run_sync(self.processes.chain, pid, abandon_on_cancel=True)
        return await self.known.ancestry(pid)

    async def _by_tmux(
        self,
        place: TmuxPlace,
        snapshot: Snapshot,
        eligible: list[Backend],
        steps: list[str],
        *,
        fresh: bool,
    ) -> Decision:
        if place.socket is None:
            steps.append("inside tmux, but no TMUX variable names its server: the ranking decides")
            return RANK
        view = await self.tmux.view(place.socket, fresh=fresh)
        if view is None:
            steps.append(f"tmux at {place.socket} did not answer: the ranking decides")
            return RANK
        session = view.session_of_pane(pane_pids=place.pane_pids, pane_id=place.pane_id)
        attached = [c for c in view.clients if session is not None and c.session == session]
        pool = attached or list(view.clients)
        steps.append(
            f"inside tmux at {place.socket}, session {session or 'unknown'}: "
            + (f"{len(attached)} client(s) attached to it" if attached else "no client attached")
            + ("" if attached else f", {len(pool)} on the server")
        )
        if not pool:
            steps.append("no tmux client at all: the ranking decides")
            return RANK
        latest = max(c.activity for c in pool)
        tied = sorted((c for c in pool if c.activity == latest), key=lambda c: c.tty)
        matches = await trio.to_thread.run_sync(
            self._client_sessions, tied, snapshot, fresh, abandon_on_cancel=True
        )
        best: tuple[TmuxClient, SessionMatch] | None = None
        for client, match in matches:
            where = f"{_describe_agent(match.backend)}" if match is not None else "no known session"
            steps.append(
                f"most recently active: tmux client {client.tty} (pid {client.pid}): {where}"
            )
            if match is not None and match.backend in eligible:
                rank = eligible.index(match.backend)
                if best is None or rank < eligible.index(best[1].backend):
                    best = (client, match)
        if best is None:
            steps.append("its session's agent is not usable: the ranking decides")
            return RANK
        client, match = best
        return Decision(
            ChosenBy.TMUX_CLIENT, match.backend, tmux_client=client.tty, sshd_pid=match.sshd_pid
        )

    def _client_sessions(
        self, clients: Sequence[TmuxClient], snapshot: Snapshot, fresh: bool
    ) -> list[tuple[TmuxClient, SessionMatch | None]]:
        """Each client's session; a pid now held by another process counts as none."""
        boot = self.processes.boot_time()
        ticks = clock_ticks()
        found: list[tuple[TmuxClient, SessionMatch | None]] = []
        for client in clients:
            chain = (self.processes if fresh else self.known).chain(client.pid)
            process = chain.processes[0] if chain.processes else None
            genuine = (
                process is not None
                and process.is_tmux_client
                and boot is not None
                and boot + process.start / ticks <= client.created + _CREATED_SLACK
            )
            found.append((client, match_session(chain, snapshot.backends) if genuine else None))
        return found
