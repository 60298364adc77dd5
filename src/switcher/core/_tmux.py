"""Asking a tmux server which of its clients was used last.

Only the tmux server knows when each client last had input
(``client_activity``), so affinity runs ``tmux -S SOCKET list-clients``
(and ``list-panes``, to learn which session a pane belongs to) in a
subprocess: never on the event loop's time, bounded by a timeout, and
cached briefly so that a burst of agent connections costs one query.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

# The tmux binary, found on PATH as the user's shell would.
TMUX = "tmux"

# A tmux server answers list-clients in milliseconds; one that has not
# answered in this long is stopped or wedged, and affinity falls back to
# the ranking rather than make the client wait.
QUERY_TIMEOUT = 1.0

# How long one answer is reused. Long enough that a burst of agent
# connections (ssh, git fetching several remotes) costs one query; short
# next to the time it takes a person to move to another machine and type
# a command there.
CACHE_LIFETIME = 0.25

# One line per client, then one per pane; tmux never puts a space in these
# fields, so the tty, which comes last, is taken whole.
_CLIENT_FORMAT = "c #{client_activity} #{client_created} #{client_pid} #{session_id} #{client_tty}"
_PANE_FORMAT = "p #{pane_id} #{pane_pid} #{session_id}"

Runner = Callable[[Sequence[str]], Awaitable[bytes | None]]


@attrs.frozen
class TmuxClient:
    """One attached tmux client: its terminal, its process, when it was last used."""

    tty: str
    pid: int
    activity: int  # seconds since the epoch of its last input
    created: int  # seconds since the epoch it attached
    session: str  # the tmux session it shows, e.g. "$0"


@attrs.frozen
class TmuxView:
    """What one tmux server said: its clients, and which session each pane is in."""

    clients: tuple[TmuxClient, ...]
    pane_sessions_by_id: tuple[tuple[str, str], ...]
    pane_sessions_by_pid: tuple[tuple[int, str], ...]

    def session_of_pane(self, *, pane_pids: Sequence[int], pane_id: str | None) -> str | None:
        """The session of the pane whose process is one of ``pane_pids``, else of ``pane_id``."""
        for pid, session in self.pane_sessions_by_pid:
            if pid in pane_pids:
                return session
        for pid_text, session in self.pane_sessions_by_id:
            if pid_text == pane_id:
                return session
        return None


def argv(socket: str) -> list[str]:
    """One tmux invocation that lists the clients, then every pane of the server."""
    clients = ["list-clients", "-F", _CLIENT_FORMAT]
    panes = ["list-panes", "-a", "-F", _PANE_FORMAT]
    return [TMUX, "-S", socket, *clients, ";", *panes]


def parse(output: bytes) -> TmuxView:
    """Read what :func:`argv` printed; lines that do not parse are skipped."""
    clients: list[TmuxClient] = []
    by_id: list[tuple[str, str]] = []
    by_pid: list[tuple[int, str]] = []
    for line in output.decode(errors="replace").splitlines():
        fields = line.split(" ", 5)
        try:
            if fields[0] == "c" and len(fields) == 6:
                activity, created, pid, session, tty = fields[1:]
                clients.append(TmuxClient(tty, int(pid), int(activity), int(created), session))
            elif fields[0] == "p" and len(fields) == 4:
                pane_id, pane_pid, session = fields[1:]
                by_id.append((pane_id, session))
                by_pid.append((int(pane_pid), session))
        except ValueError:
            continue
    return TmuxView(tuple(clients), tuple(by_id), tuple(by_pid))


async def _kill(process: trio.Process) -> None:
    process.kill()


async def run_tmux(command: Sequence[str]) -> bytes | None:
    """Run a tmux client; its output, or None if it failed or could not start."""
    try:
        result = await trio.run_process(
            list(command),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            deliver_cancel=_kill,
        )
    except OSError:
        return None  # no tmux installed, or out of processes
    return result.stdout if result.returncode == 0 else None


@attrs.define(eq=False)
class _Answer:
    done: trio.Event = attrs.Factory(trio.Event)
    view: TmuxView | None = None
    at: float = -math.inf


@attrs.define(eq=False)
class TmuxQuery:
    """Queries tmux servers by socket, one at a time per server, with a short cache."""

    run: Runner = run_tmux
    timeout: float = QUERY_TIMEOUT
    lifetime: float = CACHE_LIFETIME
    _answers: dict[str, _Answer] = attrs.Factory(dict)
    _queries: int = 0

    @property
    def queries(self) -> int:
        """How many times tmux was actually run."""
        return self._queries

    async def view(self, socket: str, *, fresh: bool = False) -> TmuxView | None:
        """The server's clients and panes, or None if it did not answer in time.

        Callers arriving while a query runs share its answer; an answer (a
        failure too) is reused for ``lifetime`` seconds unless ``fresh``.
        """
        answer = self._answers.get(socket)
        now = trio.current_time()
        if answer is not None and (
            not answer.done.is_set() or (not fresh and now - answer.at < self.lifetime)
        ):
            await answer.done.wait()
            return answer.view
        answer = self._answers[socket] = _Answer()
        self._queries += 1
        finished = False
        try:
            with trio.move_on_after(self.timeout):
                output = await self.run(argv(socket))
                answer.view = parse(output) if output is not None else None
            finished = True
        finally:
            answer.at = trio.current_time()
            answer.done.set()
            if not finished and self._answers.get(socket) is answer:
                # Our caller was cancelled: those waiting get no answer this
                # time, and nobody later inherits a failure that was not tmux's.
                del self._answers[socket]
        self._forget_old(answer.at)
        return answer.view

    def _forget_old(self, now: float) -> None:
        """Drop answers past their lifetime, so servers that came and went leave nothing."""
        for socket, answer in list(self._answers.items()):
            if answer.done.is_set() and now - answer.at >= self.lifetime:
                del self._answers[socket]
