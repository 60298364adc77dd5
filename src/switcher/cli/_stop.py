"""``switcher stop``: ask a running daemon to stop, and wait until it has.

The daemon stops as on SIGTERM (docs/control-protocol.md, ``stop``): it
replies with its pid, drains, removes its sockets and exits. We wait for
the process itself, through a pidfd, so "stopped" means exited, not merely
"stopped answering". Standard library only, like ``switcher ctl``.
"""

from __future__ import annotations

import os
import select
import time

from switcher.cli._control_client import ClientError, Connection, Daemon, check
from switcher.cli._exit import EXIT_NO_DAEMON, EXIT_OK, EXIT_REFUSED, fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

# How often the fallback without pidfds looks at /proc (old kernels only).
_POLL_S = 0.02


def run(args: argparse.Namespace) -> int:
    """Carry out ``switcher stop``; return the exit status."""
    daemon = Daemon(args.control_path, args.socket_path)
    deadline = time.monotonic() + args.timeout
    try:
        with Connection.open(daemon) as connection:
            _, reply = connection.request("stop")
            check(reply)
            pid = int(reply["pid"])
            socket_path = str(reply["socket_path"])
            # The daemon holds this connection open until it has drained, so
            # the pid is still its own while we open a handle on it.
            exited = _wait_exited(pid, deadline)
    except ClientError as exc:
        if exc.status == EXIT_NO_DAEMON:
            fail(f"no daemon at {daemon.control_path}: nothing to stop")
        else:
            fail(str(exc))
        return exc.status
    except (KeyError, TypeError, ValueError):
        fail("the daemon's reply to stop does not have the expected shape")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_REFUSED  # the daemon goes on stopping; we just did not see it end
    if not exited:
        fail(f"the daemon (pid {pid}) did not stop within {args.timeout:g} s")
        return EXIT_REFUSED
    if os.path.lexists(socket_path):
        fail(f"the daemon (pid {pid}) has exited, but its socket {socket_path} is still there")
        return EXIT_REFUSED
    print(f"stopped the daemon (pid {pid}) that served {socket_path}", flush=True)
    return EXIT_OK


def _wait_exited(pid: int, deadline: float) -> bool:
    """Wait until process ``pid`` has exited, or ``deadline`` passes; say which."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        return _poll_exited(pid, deadline)
    try:
        # A pidfd is readable once its process has exited (zombie or reaped).
        readable, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        return bool(readable)
    finally:
        os.close(pidfd)


def _poll_exited(pid: int, deadline: float) -> bool:
    """Without pidfds: look at /proc until the process is gone or a zombie."""
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                # The state follows the command name, which ends at the last ')'.
                state = stat.read().rpartition(b")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state in (b"Z", b"X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
