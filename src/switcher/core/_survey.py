"""Who each agent serves: the SSH sessions and tmux clients behind it, for ``ctl list``.

The same evidence as affinity uses, gathered for all of our processes at
once: a login shell (one of ours whose parent is not, i.e. sshd's session
process) belongs to the session its environment or its parent names; a
tmux client, found through the servers that panes' ``TMUX`` variables
name, belongs to the session it was started from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import trio

from switcher.core._affinity import match_session
from switcher.core._backend import Backend, Snapshot
from switcher.core._proctree import Chain, Process, ProcessTable, Stop
from switcher.core._tmux import TmuxClient, TmuxQuery

# Linux's Unix98 pty majors (Documentation/admin-guide/devices.txt): 136-143.
_PTS_MAJORS = range(136, 144)
_PTS_PER_MAJOR = 256


@attrs.frozen
class SessionSeen:
    """An SSH session: its sshd's pid (when known) and its login shell."""

    sshd_pid: int | None
    shell_pid: int
    tty: str | None  # e.g. "pts/3"; None for a session without a terminal


@attrs.frozen
class TmuxClientSeen:
    """A tmux client and when it last had input."""

    tty: str
    pid: int
    activity: int  # seconds since the epoch
    socket: str


@attrs.frozen
class Served:
    """What one agent serves."""

    sessions: tuple[SessionSeen, ...] = ()
    tmux_clients: tuple[TmuxClientSeen, ...] = ()


def tty_name(tty_nr: int) -> str | None:
    """``pts/N`` for a pseudo-terminal's device number (stat's tty_nr), else None."""
    major = (tty_nr >> 8) & 0xFFF
    minor = (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    if major not in _PTS_MAJORS:
        return None
    return f"pts/{(major - _PTS_MAJORS.start) * _PTS_PER_MAJOR + minor}"


def _ours(table: ProcessTable) -> dict[int, Process]:
    return {p.pid: p for pid in table.pids() if (p := table.read(pid)) is not None}


def sessions_by_agent(
    processes: Mapping[int, Process], backends: Sequence[Backend]
) -> dict[str, list[SessionSeen]]:
    """Login shells (ours, with a parent that is not) grouped by the agent they name."""
    found: dict[str, dict[int, SessionSeen]] = {}
    for process in processes.values():
        if process.ppid <= 1 or process.ppid in processes:
            continue
        match = match_session(Chain((process,), Stop.NOT_OURS), backends)
        if match is None:
            continue
        seen = SessionSeen(match.sshd_pid, process.pid, tty_name(process.tty))
        # One session can hold several such processes (a shell and an sftp-server):
        # keep its first.
        found.setdefault(match.backend.id, {}).setdefault(match.sshd_pid or -process.pid, seen)
    return {backend_id: list(by_sshd.values()) for backend_id, by_sshd in found.items()}


async def survey(table: ProcessTable, tmux: TmuxQuery, snapshot: Snapshot) -> dict[str, Served]:
    """For each agent id in ``snapshot``, the sessions and tmux clients it serves."""
    processes = await trio.to_thread.run_sync(_ours, table)
    sessions = sessions_by_agent(processes, snapshot.backends)
    sockets = sorted({s for p in processes.values() if (s := p.tmux_socket) is not None})
    clients: dict[str, list[TmuxClientSeen]] = {}
    for socket in sockets:
        view = await tmux.view(socket)
        if view is None:
            continue
        for client, backend_id in await trio.to_thread.run_sync(
            _client_agents, table, view.clients, snapshot.backends
        ):
            seen = TmuxClientSeen(client.tty, client.pid, client.activity, socket)
            clients.setdefault(backend_id, []).append(seen)
    return {
        b.id: Served(tuple(sessions.get(b.id, ())), tuple(clients.get(b.id, ())))
        for b in snapshot.backends
    }


def _client_agents(
    table: ProcessTable, clients: Sequence[TmuxClient], backends: Sequence[Backend]
) -> list[tuple[TmuxClient, str]]:
    found: list[tuple[TmuxClient, str]] = []
    for client in clients:
        chain = table.chain(client.pid)
        if not chain.processes or not chain.processes[0].is_tmux_client:
            continue
        match = match_session(chain, backends)
        if match is not None:
            found.append((client, match.backend.id))
    return found
