"""The user's own processes, read from /proc: parents, start times, a few variables.

Session affinity needs to know, for a client's process, its ancestors and
the ``SSH_AUTH_SOCK``, ``TMUX``, ``TMUX_PANE`` and ``STY`` each started
with. Only processes whose ``/proc/PID`` entry belongs to our uid are read:
the kernel makes that entry root's when a process is not dumpable (sshd's
session process, anything setuid) or when the process is another user's,
and such a process is never opened further.

Each process is read through a descriptor of its own ``/proc/PID``
directory. That directory stands for one process, not for a number: if the
process exits and its pid is reused meanwhile, reads through the old
descriptor fail instead of describing the newcomer. Between a child and
its parent, start times guard the same way (a parent starts before its
child; a "parent" that started later is a stranger that took the pid).

The root is a parameter so that tests point it at fixture trees.
"""

from __future__ import annotations

import enum
import functools
import os
from collections.abc import Callable

import attrs

# The environment variables affinity uses; nothing else of an environment is kept.
_WANTED = {
    b"SSH_AUTH_SOCK": "auth_sock",
    b"TMUX": "tmux",
    b"TMUX_PANE": "tmux_pane",
    b"STY": "sty",
}

# An initial environment can be as large as ARG_MAX allows (a few MiB); the
# variables we want come from a login, which keeps them near the start.
_ENVIRON_LIMIT = 256 * 1024

# One read's size: a stat line is a few hundred bytes, an environment a few KiB.
_READ_SIZE = 64 * 1024

# How many ancestors are followed at most: real chains are a handful deep
# (client, shell, tmux or sshd), this only bounds a corrupted view.
MAX_DEPTH = 64

# tmux names its processes (prctl PR_SET_NAME) "tmux: server" and "tmux: client".
_TMUX_SERVER = "tmux: server"
_TMUX_CLIENT = "tmux: client"

# Where starttime (field 22) and tty_nr (field 7) sit among the fields after
# the ")" that closes comm (which may itself hold spaces and parentheses).
_AFTER_COMM_PPID = 1
_AFTER_COMM_TTY = 4
_AFTER_COMM_START = 19


@attrs.frozen
class Process:
    """One of our processes, as /proc describes it."""

    pid: int
    ppid: int
    start: int  # clock ticks after boot
    comm: str
    tty: int  # the controlling terminal's device number; 0 for none
    auth_sock: str | None = None
    tmux: str | None = None
    tmux_pane: str | None = None
    sty: str | None = None

    @property
    def is_tmux_server(self) -> bool:
        return self.comm == _TMUX_SERVER

    @property
    def is_tmux_client(self) -> bool:
        return self.comm == _TMUX_CLIENT

    @property
    def tmux_socket(self) -> str | None:
        """The tmux server socket from ``TMUX`` (``SOCKET,SERVER_PID,SESSION``)."""
        if not self.tmux:
            return None
        socket, _, _rest = self.tmux.rpartition(",")
        socket, _, _rest = socket.rpartition(",")
        return socket or None


class Stop(enum.Enum):
    """Why a chain of ancestors ends where it does."""

    INIT = "its parent is pid 1"  # daemonised, or reparented after its parent exited
    NOT_OURS = "its parent is not one of yours"  # sshd's session process, cron, root
    GONE = "its parent exited"
    REUSED = "its parent's pid was reused"
    DEPTH = "too many ancestors"


@attrs.frozen
class Chain:
    """A process and its ancestors, nearest first, and why the list ends there."""

    processes: tuple[Process, ...]
    stop: Stop

    @property
    def top(self) -> Process | None:
        return self.processes[-1] if self.processes else None


def parse_stat(data: bytes) -> tuple[int, str, int, int, int]:
    """(pid, comm, ppid, tty_nr, starttime) from the text of /proc/PID/stat."""
    head, _, tail = data.rpartition(b")")
    pid_text, _, comm = head.partition(b" (")
    fields = tail.split()
    return (
        int(pid_text),
        comm.decode(errors="replace"),
        int(fields[_AFTER_COMM_PPID]),
        int(fields[_AFTER_COMM_TTY]),
        int(fields[_AFTER_COMM_START]),
    )


def parse_environ(data: bytes) -> dict[str, str]:
    """The variables affinity uses, from the NUL-separated text of /proc/PID/environ."""
    found: dict[str, str] = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        field = _WANTED.get(name)
        if sep and field is not None and field not in found:
            found[field] = os.fsdecode(value)
    return found


def _read_at(dir_fd: int, name: str, limit: int) -> bytes:
    """Up to ``limit`` bytes of a /proc file.

    procfs fills each read as far as it can, so a short read is the end:
    a stat or a typical environment takes one system call, not two.
    """
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            want = min(_READ_SIZE, limit - size)
            chunk = os.read(fd, want)
            chunks.append(chunk)
            size += len(chunk)
            if len(chunk) < want:
                break
        return b"".join(chunks)
    finally:
        os.close(fd)


@attrs.frozen
class ProcessTable:
    """Our processes in a /proc tree; every method reads afresh and never raises OSError."""

    uid: int
    root: str = "/proc"

    def read(self, pid: int) -> Process | None:
        """One process, if it exists, is ours (and dumpable) and could be read."""
        opened = self.read_keeping(pid)
        if opened is None:
            return None
        process, dir_fd = opened
        os.close(dir_fd)
        return process

    def read_keeping(self, pid: int) -> tuple[Process | None, int] | None:
        """Like ``read``, but also hands over the open ``/proc/PID`` descriptor.

        None when there is nothing to hold (no such process, or it could not
        be read); (None, descriptor) for a process that is not ours. The
        descriptor keeps standing for that one process: see ``alive``.
        """
        if pid <= 0:
            return None
        try:
            dir_fd = os.open(f"{self.root}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(dir_fd).st_uid != self.uid:
                return None, dir_fd  # another user's, or not dumpable: never read further
            stat_pid, comm, ppid, tty, start = parse_stat(_read_at(dir_fd, "stat", 4096))
            environ = parse_environ(_read_at(dir_fd, "environ", _ENVIRON_LIMIT))
        except (OSError, ValueError, IndexError):
            os.close(dir_fd)
            return None  # exited, or an entry we cannot make sense of
        if stat_pid != pid:
            os.close(dir_fd)
            return None
        process = Process(pid=pid, ppid=ppid, start=start, comm=comm, tty=tty, **environ)
        return process, dir_fd

    def alive(self, dir_fd: int, *, ours: bool) -> bool:
        """Whether the process behind a ``read_keeping`` descriptor still runs, as ours or not.

        One system call: once the process is gone, its directory is empty,
        even if the pid now belongs to another process.
        """
        try:
            owner = os.stat("stat", dir_fd=dir_fd).st_uid
        except OSError:
            return False
        return (owner == self.uid) is ours

    def chain(self, pid: int) -> Chain:
        """``pid`` and its ancestors, as far as they are ours; empty if ``pid`` is not."""
        chain = self.walk(pid, self._parent)
        assert chain is not None  # this parent lookup never gives up
        return chain

    def _parent(self, pid: int) -> Process | Stop:
        process = self.read(pid)
        return self.absent(pid) if process is None else process

    def walk(self, pid: int, parent: Callable[[int], Process | Stop | None]) -> Chain | None:
        """``pid`` read afresh, then its ancestors as ``parent`` finds them.

        ``parent`` gives the process with that pid, or why the walk stops
        there, or None to give up the walk (its caller's budget ran out).
        """
        first = self.read(pid)
        if first is None:
            return Chain((), self.absent(pid))
        processes = [first]
        while True:
            child = processes[-1]
            if child.ppid <= 1:
                return Chain(tuple(processes), Stop.INIT)
            if len(processes) >= MAX_DEPTH:
                return Chain(tuple(processes), Stop.DEPTH)
            found = parent(child.ppid)
            if found is None:
                return None
            if isinstance(found, Stop):
                return Chain(tuple(processes), found)
            if found.start > child.start:
                return Chain(tuple(processes), Stop.REUSED)
            processes.append(found)

    def absent(self, pid: int) -> Stop:
        """Why ``pid`` could not be read: another user's (or unreadable), or gone."""
        return Stop.NOT_OURS if self.exists(pid) else Stop.GONE

    def exists(self, pid: int) -> bool:
        return pid > 0 and os.path.exists(f"{self.root}/{pid}")

    def pids(self) -> list[int]:
        """Every pid in the table, ours or not (reading one is what checks)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted(int(name) for name in names if name.isdigit())

    def boot_time(self) -> float | None:
        """When the machine booted, in seconds since the epoch (``btime`` in /proc/stat)."""
        return _boot_time(self.root)


@functools.cache
def _boot_time(root: str) -> float | None:
    # Read once: the machine boots once per daemon.
    try:
        with open(f"{root}/stat", "rb") as stat_file:
            for line in stat_file:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def clock_ticks() -> int:
    """How many start-time ticks make a second (``getconf CLK_TCK``)."""
    return os.sysconf("SC_CLK_TCK")
