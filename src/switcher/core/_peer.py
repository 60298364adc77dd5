"""Who is on the other end of a Unix socket, and opening backend connections."""

from __future__ import annotations

import errno
import os
import socket
import struct

import attrs
import trio

from switcher.core._relaysocket import RelaySocket

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# A backend whose listen backlog is full is wedged; waiting longer than this
# for connect() only delays failover to a working one.
CONNECT_TIMEOUT = 2.0
# How often a connect to a full backlog is retried within that time.
_BACKLOG_RETRY = 0.01


@attrs.frozen
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: trio.socket.SocketType | socket.socket) -> PeerCredentials:
    """The connecting process's credentials, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


def uid_allowed(uid: int, own_uid: int) -> bool:
    """ssh-agent's rule: only its own user and root may talk to it."""
    return uid in (0, own_uid)


class LocalResourceError(Exception):
    """We could not even try a backend (out of descriptors or memory): not its fault."""


class BackendUnavailableError(Exception):
    """A backend could not be used; the message is a short reason for logs and ``ctl list``."""


def describe_os_error(exc: OSError) -> str:
    """A short, stable reason for an OS error, e.g. ``connection refused``."""
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return type(exc).__name__


async def open_backend(path: str, *, refuse_pid: int | None) -> RelaySocket:
    """Connect to a backend agent socket and make sure it is not an impostor.

    The listener must belong to our user (or root), and must not be
    ``refuse_pid`` (the daemon passes its own pid: relaying to ourselves
    would loop forever; tests serving fake agents in-process pass None).
    """
    try:
        # Non-blocking from the start: no separate system call to make it so.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:
        raise LocalResourceError(describe_os_error(exc)) from None
    try:
        await _connect(sock, path)
        peer = peer_credentials(sock)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOENT:
            raise BackendUnavailableError("socket vanished") from None
        raise BackendUnavailableError(describe_os_error(exc)) from None
    except BaseException:
        sock.close()
        raise
    if not uid_allowed(peer.uid, os.getuid()):
        sock.close()
        raise BackendUnavailableError(f"listener belongs to uid {peer.uid}")
    if peer.pid == refuse_pid:
        sock.close()
        raise BackendUnavailableError("listener is switcher itself")
    return RelaySocket(sock)


async def _connect(sock: socket.socket, path: str) -> None:
    """Connect a non-blocking Unix socket.

    A Unix connect either completes at once or fails at once, except when
    the listener's backlog is full (EAGAIN): then the listener is busy or
    wedged, and we retry briefly before giving up on it.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    deadline = trio.current_time() + CONNECT_TIMEOUT
    while True:
        try:
            sock.connect(path)
        except BlockingIOError:
            if trio.current_time() >= deadline:
                raise BackendUnavailableError("listen backlog full") from None
            await trio.sleep(_BACKLOG_RETRY)
        else:
            return
