"""Running switcher for real, in a subprocess, the way users do."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio

from switcher.served import socket_answers

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

SWITCHER = [sys.executable, "-m", "switcher"]

# CI runs as root, and the daemon refuses root unless told otherwise.
ALLOW_ROOT = ["--allow-root"] if os.geteuid() == 0 else []


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SWITCHER, *args], capture_output=True, text=True, timeout=60, check=False
    )


# Whether something accepts connections on a Unix socket: the daemon's own check.
accepts = socket_answers


@attrs.define(eq=False)
class Daemon:
    process: trio.Process
    socket_path: Path
    control_path: Path
    log_path: Path
    # Where the daemon says READY=1 (and STOPPING=1): systemd's protocol,
    # which tells a test the daemon is up without polling anything.
    notify: trio.socket.SocketType

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return await self.wait()

    async def wait(self) -> int:
        """Wait until the daemon has exited; then close what the test held for it."""
        status = await self.process.wait()
        self.notify.close()
        return status


async def wait_ready(process: trio.Process, notify: trio.socket.SocketType) -> None:
    """Wait until the daemon sends READY=1 on ``notify``; fail if it exits first."""
    async with trio.open_nursery() as nursery:

        async def exited() -> None:
            status = await process.wait()
            raise AssertionError(f"daemon exited with {status} before it was ready")

        nursery.start_soon(exited)
        while b"READY=1" not in (await notify.recv(4096)).split(b"\n"):
            pass
        nursery.cancel_scope.cancel()


def notify_socket(path: Path) -> trio.socket.SocketType:
    """A datagram socket at ``path`` standing in for systemd's NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return trio.socket.from_stdlib_socket(sock)


async def start_daemon(
    tmp: Path,
    *extra: str,
    agents: Sequence[Path] = (),
    preexec_fn: Callable[[], object] | None = None,
    env: Mapping[str, str] | None = None,
) -> Daemon:
    """Start ``switcher daemon`` and wait until it reports that it serves (READY=1).

    ``preexec_fn`` runs in the child before exec (to lower a resource limit,
    say); ``env`` replaces the environment. Both default to what a user has.
    """
    socket_path = tmp / "s.sock"
    control_path = tmp / "c.sock"
    log_path = tmp / "daemon.log"
    notify = notify_socket(tmp / "n.sock")
    agents_dirs = ":".join(str(a) for a in agents) or str(tmp / "none")
    process = await trio.lowlevel.open_process(
        [
            *SWITCHER,
            "daemon",
            *ALLOW_ROOT,
            "--socket-path",
            str(socket_path),
            "--control-path",
            str(control_path),
            "--agents-dirs",
            agents_dirs,
            "--log-file",
            str(log_path),
            *extra,
        ],
        preexec_fn=preexec_fn,
        env={**(os.environ if env is None else env), "NOTIFY_SOCKET": str(tmp / "n.sock")},
    )
    await wait_ready(process, notify)
    return Daemon(process, socket_path, control_path, log_path, notify)


# -- waiting for a daemon's log, without polling ------------------------------

# inotify(7): the kernel says when a file changes, so a test waits for the
# daemon's next log line instead of re-reading the log on a timer.
_IN_MODIFY = 0x002
_IN_CREATE = 0x100
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def _watch(path: Path) -> Iterator[int]:
    """An inotify descriptor that becomes readable when ``path`` (a file, or a directory's
    entries) is written to or gains an entry."""
    fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    try:
        if _libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY | _IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        yield fd
    finally:
        os.close(fd)


async def wait_logged(log: Path, condition: Callable[[list[dict[str, object]]], bool]) -> None:
    """Wait until the JSON log at ``log`` satisfies ``condition`` (given all its events).

    The watch is set before each look, so a line written in between still wakes us.
    Unbounded: callers put a deadline around it.
    """
    while True:
        with _watch(log if log.exists() else log.parent) as changes:
            if condition(log_events(log)):
                return
            await trio.lowlevel.wait_readable(changes)


def logged(event: str, count: int = 1) -> Callable[[list[dict[str, object]]], bool]:
    """A ``wait_logged`` condition: ``event`` has been logged at least ``count`` times."""
    return lambda events: [e["event"] for e in events].count(event) >= count


# -- looking at a running daemon from outside (fault and soak tests) ----------

# The daemon makes itself non-dumpable (PR_SET_DUMPABLE 0, as ssh-agent does), which
# leaves its /proc/PID/fd and cwd to root: tests that look at them need root.
needs_root_to_look_inside = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="reads the daemon's /proc/PID/fd, which only root may: the daemon is not dumpable",
)

# How often the helpers below look at /proc: often enough that a test waits
# little longer than the daemon needs, rarely enough to cost it nothing.
_POLL_INTERVAL = 0.05

# A descriptor of a process's /proc directory, as readlink shows it.
_PROC_DIR = re.compile(r"/proc/[0-9]+")


def open_fds(pid: int) -> int:
    """How many file descriptors the process holds open now.

    Not counted: ``/proc/PID`` directories, which session affinity keeps open
    for the client ancestors it remembers (at most ``KNOWN_MAX``, each let go
    once its process exits): they are not connections that failed to close.
    """
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except FileNotFoundError:
            continue  # closed while we looked
        if not _PROC_DIR.fullmatch(target):
            count += 1
    return count


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor points at (for an assertion's message)."""
    targets = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets.append((int(fd.name), f"{fd.name} -> {fd.readlink()}"))
        except FileNotFoundError:
            continue  # closed while we looked
    return [text for _, text in sorted(targets)]


def rss_kib(pid: int) -> int:
    """The process's resident set size in KiB (``VmRSS`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def wait_open_fds_at_most(pid: int, limit: int) -> int:
    """Wait until the process holds at most ``limit`` descriptors; return the count.

    Unbounded: callers put a deadline around it and check the count after.
    """
    # Polling: nothing signals another process's descriptor count.
    while (count := open_fds(pid)) > limit:
        await trio.sleep(_POLL_INTERVAL)
    return count


async def settled_open_fds(pid: int, *, quiet: float = 0.3) -> int:
    """The descriptor count once it has stayed the same for ``quiet`` seconds."""
    count = open_fds(pid)
    unchanged_since = trio.current_time()
    while trio.current_time() - unchanged_since < quiet:
        await trio.sleep(_POLL_INTERVAL)
        now = open_fds(pid)
        if now != count:
            count, unchanged_since = now, trio.current_time()
    return count


async def control_request(path: Path, request: dict[str, object]) -> dict[str, Any]:
    """Send one control request (docs/control-protocol.md) and return the parsed reply."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise EOFError("control socket closed before a whole reply")
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


async def terminate(daemon: Daemon) -> int:
    """Stop a daemon for good: SIGTERM, and SIGKILL if it is still there after a while."""
    if daemon.process.returncode is None:
        daemon.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await daemon.process.wait()
        if daemon.process.returncode is None:
            daemon.process.kill()
    return await daemon.wait()


# -- detached daemons: `switcher daemon --daemon` and what starts it ----------

# The files a detached test daemon uses, all inside one short temporary dir,
# never the real /tmp/switcher-$UID or ~/.local/state.
SOCKET_NAME = "s.sock"
CONTROL_NAME = "c.sock"
PID_NAME = "switcher.pid"
LOG_NAME = "daemon.log"


def daemon_flags(tmp: Path, *, agents: Sequence[Path] = ()) -> list[str]:
    """Flags that keep a daemon's sockets, pid file and log in ``tmp``."""
    return [
        *ALLOW_ROOT,
        *("--socket-path", str(tmp / SOCKET_NAME)),
        *("--control-path", str(tmp / CONTROL_NAME)),
        *("--pid-file", str(tmp / PID_NAME)),
        *("--log-file", str(tmp / LOG_NAME)),
        *("--agents-dirs", ":".join(str(a) for a in agents) or str(tmp / "none")),
    ]


def log_events(path: Path) -> list[dict[str, object]]:
    """The JSON log lines at ``path`` (none if there is no file yet)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


@attrs.define(eq=False)
class Reaper:
    """Kills, when a test ends however it ends, every daemon the test started.

    It holds a pidfd for each, so a daemon that exited on its own and whose
    pid was reused never causes an unrelated process to be signalled.
    """

    _pidfds: list[int] = attrs.Factory(list)

    def adopt(self, pid: int) -> int:
        """Look after ``pid``; return its pidfd, readable once the process has exited."""
        pidfd = os.pidfd_open(pid)
        self._pidfds.append(pidfd)
        return pidfd

    def adopt_pid_file(self, path: Path) -> tuple[int, int]:
        """Look after the daemon named in ``path``; return its pid and pidfd."""
        pid = int(path.read_text())
        return pid, self.adopt(pid)

    def kill_all(self) -> None:
        for pidfd in self._pidfds:
            with contextlib.suppress(ProcessLookupError):  # gone already
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], 10)  # let it go before the next test starts
            os.close(pidfd)
        self._pidfds.clear()


async def wait_exited(pidfd: int) -> None:
    """Wait, without polling, until the process behind ``pidfd`` has exited (not our child)."""
    await trio.lowlevel.wait_readable(pidfd)


def has_exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])
