"""systemd without libsystemd: socket activation and readiness notifications.

Both protocols are small and stable (sd_listen_fds(3), sd_notify(3)), so they
are spoken here with the standard library alone: the command line reads the
activation environment before it loads trio. Without systemd (no
``LISTEN_PID`` naming us, no ``NOTIFY_SOCKET``) none of this does anything.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# socket is imported where it is used: without systemd (and when a daemon
# already runs) start-up should not pay for it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import MutableMapping

# The first inherited descriptor: SD_LISTEN_FDS_START in sd-daemon.h.
LISTEN_FDS_START = 3

# The names the daemon looks for in LISTEN_FDNAMES (FileDescriptorName= in a
# .socket unit); a socket passed under another name is matched by its path.
AGENT_FD_NAME = "agent"
CONTROL_FD_NAME = "control"

# What socket activation sets. They are consumed at start-up, as
# sd_listen_fds(1) does, so that nothing we might start inherits them.
_ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """What systemd passed us is unusable; the message says why in one line."""


def listen_fds(environ: MutableMapping[str, str], pid: int) -> list[tuple[str, int]]:
    """The descriptors passed to process ``pid``, with their names; removes the variables.

    Empty without socket activation, and when the variables were meant for
    another process (``LISTEN_PID`` is not ``pid``: something that was itself
    activated started us). Names are ``unknown`` when ``LISTEN_FDNAMES`` is
    unset, as in sd_listen_fds_with_names(3).
    """
    listen_pid, count_text, names = (environ.pop(name, None) for name in _ACTIVATION_VARIABLES)
    if listen_pid is None or count_text is None:
        return []
    try:
        target, count = int(listen_pid), int(count_text)
    except ValueError:
        raise ActivationError(
            f"LISTEN_PID and LISTEN_FDS must be numbers, not {listen_pid!r} and {count_text!r}"
        ) from None
    if target != pid or count == 0:
        return []
    if count < 0:
        raise ActivationError(f"LISTEN_FDS must not be negative: {count}")
    fd_names = names.split(":") if names is not None else ["unknown"] * count
    if len(fd_names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES names {len(fd_names)} descriptors but LISTEN_FDS says {count}"
        )
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + count)
    for fd in fds:
        try:
            # sd_listen_fds(3) does this too: the descriptors are ours alone.
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(
                f"inherited descriptor {fd} is unusable: {exc.strerror}"
            ) from None
    return list(zip(fd_names, fds, strict=True))


def listening_unix_socket(name: str, fd: int) -> tuple[Path, socket.socket]:
    """Take over inherited descriptor ``fd``: a listening Unix stream socket with a path."""
    try:
        import socket

        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"inherited descriptor {fd} ({name}): {exc.strerror}") from None
    address: object = None
    if (
        sock.family == socket.AF_UNIX
        and sock.type == socket.SOCK_STREAM
        and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        address = sock.getsockname()
    if not isinstance(address, str) or not address.startswith("/"):
        sock.close()
        raise ActivationError(
            f"inherited descriptor {fd} ({name}) is not a listening Unix stream socket with a path"
        )
    return Path(address), sock


def notify(address: str, message: str) -> None:
    """Send one sd_notify(3) message (``READY=1``, ``STOPPING=1``, ``STATUS=...``).

    ``address`` is ``$NOTIFY_SOCKET``: a path, or ``@name`` in the abstract
    namespace. It never blocks: a message the manager cannot take at once is
    dropped with an OSError, which callers log and otherwise ignore.
    """
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        raise OSError(errno.EAFNOSUPPORT, f"unsupported NOTIFY_SOCKET address {address!r}")
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, target)
