"""``switcher daemon --daemon``: run in the background, and say whether that worked.

The classic double fork: the child starts a new session (no controlling
terminal) and forks again, so the daemon is not a session leader and can
never acquire a terminal. It works from ``/``, with stdin, stdout and
stderr on ``/dev/null``, and keeps none of the descriptors its caller left
open (a ``$(...)`` would otherwise wait for it forever).

A pipe carries one line back to the process the user started: ready, or the
exit status and the one-line reason the daemon cannot start. That process
prints the reason and exits with the status, as the foreground daemon
would; it never polls.

Standard library only, like everything before the daemon imports trio.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from switcher.cli._exit import EXIT_OK, EXIT_REFUSED, fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# What a daemon that is up writes on the pipe; a failure writes "STATUS REASON".
_READY = "0"


class StartReport:
    """How a starting daemon tells whoever started it: ready, or why not.

    In the foreground that is the user, on stderr. Detached, it is the
    original process, waiting at the other end of ``fd``. Only the first
    report counts: the pipe is closed after it.
    """

    def __init__(self, fd: int | None = None) -> None:
        self._fd = fd
        self._detached = fd is not None

    def ready(self) -> None:
        self._send(_READY)

    def failed(self, status: int, message: str) -> None:
        if self._detached:
            self._send(f"{status} {message}")
        else:
            fail(message)

    def _send(self, line: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, line.encode("utf-8", "backslashreplace") + b"\n")
        except OSError:
            pass  # the starter was killed while it waited: nobody is left to tell
        finally:
            os.close(fd)


def daemonize(serve: Callable[[StartReport], int], *, in_starter: Callable[[], None]) -> int:
    """Run ``serve`` in a detached daemon; return the status to exit with, in each process.

    In the original process that is the daemon's start-up report (0 once it
    listens). Its copies of the daemon's sockets and locks close when it
    exits, which leaves them to the daemon. It calls ``in_starter`` first
    (to give signals their usual actions back: only the daemon holds them).
    In the daemon it is ``serve``'s own status.
    """
    read_fd, write_fd = os.pipe()
    # Anything still buffered would otherwise be written twice.
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        in_starter()
        os.close(write_fd)
        try:
            return _wait_for_report(read_fd)
        finally:
            os.waitpid(child, 0)  # it exits as soon as it has forked the daemon
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(EXIT_OK)  # the session leader goes; the daemon is its orphan
    os.chdir("/")  # hold no directory busy (an unmount must not fail on us)
    _stdio_to_devnull()
    _close_inherited()
    report = StartReport(write_fd)
    try:
        return serve(report)
    except BaseException as exc:
        report.failed(EXIT_REFUSED, f"the daemon failed to start: {exc!r}")
        raise


def _wait_for_report(fd: int) -> int:
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    finally:
        os.close(fd)
    line = data.decode("utf-8", "replace").rstrip("\n")
    if not line:
        fail("the daemon exited before it was ready, without saying why")
        return EXIT_REFUSED
    status, _, message = line.partition(" ")
    if message:
        fail(message)
    return int(status) if status.isdigit() else EXIT_REFUSED


def _stdio_to_devnull() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _close_inherited() -> None:
    """Close what our caller passed on: the descriptors still open across exec.

    Python opens its own non-inheritable (PEP 446), and so does switcher
    (sockets, locks, the pipe), so an inheritable descriptor above stderr
    came from whoever started us.
    """
    for entry in Path("/proc/self/fd").iterdir():
        fd = int(entry.name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                os.close(fd)
        except OSError:
            pass  # the descriptor that listed the directory, closed by now
