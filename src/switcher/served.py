"""The sockets the daemon serves: claimed under the instance lock, or passed by systemd.

``claim_sockets`` is the one place that takes the agent and control
sockets, for the command line (before it loads trio, so that "already
running" is answered at once) and for a daemon started without them.
Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from switcher import _systemd
from switcher.instancelock import AlreadyRunningError, lock_for, unlock
from switcher.paths import (
    MAX_SOCKET_PATH_BYTES,
    fd_identity,
    file_identity,
    lock_path,
    runtime_dir,
)
from switcher.pathsafety import UnsafePathError, ensure_private_dir, prepare_socket_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket

# Connections the kernel queues before we accept them. Logins come in
# bursts (a git operation can open dozens of agent connections), and
# queued clients cost us nothing.
LISTEN_BACKLOG = 512


def socket_answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket at ``path``."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
        return True


def claim_socket_path(path: Path) -> None:
    """Clear the way to bind ``path``, which the caller holds the lock for.

    A socket of ours that nobody answers on is left over from a daemon that
    died: remove it. One that answers belongs to a live daemon we do not
    know about (started without the lock, e.g. an older version). Anything
    else at the path is not ours to delete.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnsafePathError(f"cannot inspect {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePathError(f"{path} exists and is not a socket; refusing to replace it")
    if st.st_uid != os.getuid():
        raise UnsafePathError(f"{path} is a socket owned by uid {st.st_uid}, not by us")
    if socket_answers(path):
        raise AlreadyRunningError(f"something is already serving {path}")
    path.unlink()


def bind_private_socket(path: Path, backlog: int) -> socket.socket:
    """Bind ``path`` with mode 0600, whatever the process umask is, and listen.

    The socket appears at ``path`` already listening: a client that finds
    the file is queued in the backlog until the daemon accepts, never
    refused. (It is bound at a temporary name beside ``path``, made to
    listen, then linked into place; ``link`` never replaces what is there.)
    """
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temporary = path.with_name(f".{path.name}.{os.urandom(4).hex()}")
    if len(os.fsencode(temporary)) > MAX_SOCKET_PATH_BYTES:
        temporary = path  # no room for a longer name: bind in place
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(temporary))
        finally:
            os.umask(old_umask)
        sock.listen(backlog)
        if temporary != path:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)) from None
            finally:
                os.unlink(temporary)
    except OSError as exc:
        sock.close()
        raise UnsafePathError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


class ServedSocket:
    """A socket path the daemon serves: bound by us under the instance lock, or
    inherited from systemd (socket activation).

    One of ours is bound and listening from ``claim`` on (clients queue until
    the daemon accepts), put back by ``rebind`` when someone deletes it, and
    removed with its lock file by ``release``. An
    activated socket is systemd's: we neither lock, re-create nor remove it.
    """

    def __init__(self, path: Path, sock: socket.socket, lock_fd: int | None) -> None:
        self.path = path
        self.sock = sock
        self.lock_fd = lock_fd
        # (st_dev, st_ino) of the socket file we serve: how we tell it from a
        # newcomer at the same path, and how discovery skips it.
        self.identity = file_identity(path)

    @classmethod
    def claim(cls, path: Path) -> ServedSocket:
        """Take the lock, clear a stale socket, bind; or raise with the reason we cannot."""
        prepare_socket_dir(path, default_dir=runtime_dir())
        lock_fd = lock_for(path)
        try:
            claim_socket_path(path)
            sock = bind_private_socket(path, LISTEN_BACKLOG)
        except BaseException:
            unlock(path, lock_fd)
            raise
        return cls(path, sock, lock_fd)

    @classmethod
    def activated(cls, path: Path, sock: socket.socket) -> ServedSocket:
        """A listening socket systemd bound at ``path`` and passed to us."""
        return cls(path, sock, lock_fd=None)

    @property
    def is_activated(self) -> bool:
        return self.lock_fd is None

    def in_place(self) -> bool:
        """Whether the path still holds the socket we serve."""
        return self.identity is not None and file_identity(self.path) == self.identity

    def rebind(self, backlog: int) -> socket.socket:
        """Put a new listening socket at our path, with the checks of start-up.

        Someone removed our socket, or its whole directory (``rm``,
        systemd-tmpfiles): re-create the directory if it is gone, re-take
        the lock if its file went too, and bind again. Raises
        AlreadyRunningError if another switcher took the path meanwhile,
        UnsafePathError if the path is unusable now. The caller swaps the
        returned socket in and closes the old one.
        """
        assert self.lock_fd is not None, "activated sockets are systemd's to re-create"
        if not self.path.parent.exists():
            ensure_private_dir(self.path.parent)
        prepare_socket_dir(self.path, default_dir=runtime_dir())
        if file_identity(lock_path(self.path)) != fd_identity(self.lock_fd):
            fd = lock_for(self.path)
            os.close(self.lock_fd)  # its file is gone: nothing to remove
            self.lock_fd = fd
        claim_socket_path(self.path)
        self.sock = bind_private_socket(self.path, backlog)
        self.identity = file_identity(self.path)
        return self.sock

    def release(self) -> None:
        """Close, and unlink the socket only if it is ours and the path still holds it."""
        self.sock.close()
        if self.lock_fd is None:
            return
        if self.in_place():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        unlock(self.path, self.lock_fd)


# The agent socket and the control socket, in that order.
Sockets = tuple[ServedSocket, ServedSocket]


class AgentSocketTakenError(AlreadyRunningError):
    """Another switcher serves our agent socket: what ``--daemon`` calls success."""


def claim_sockets(socket_path: Path, control_path: Path) -> Sockets:
    """The agent and control sockets: passed by systemd, or bound here under their locks.

    Raises AgentSocketTakenError when another switcher serves the agent
    socket, AlreadyRunningError when one serves the control socket,
    UnsafePathError or ``_systemd.ActivationError`` when a path or a passed
    socket cannot be used. Nothing stays claimed when it raises.
    """
    taken: list[ServedSocket] = []
    try:
        activated = _activated_sockets(socket_path, control_path, taken)
        agent = activated.get(_systemd.AGENT_FD_NAME)
        if agent is None:
            try:
                agent = ServedSocket.claim(socket_path)
            except AlreadyRunningError as exc:
                raise AgentSocketTakenError(str(exc)) from None
            taken.append(agent)
        control = activated.get(_systemd.CONTROL_FD_NAME)
        if control is None:
            control = ServedSocket.claim(control_path)
            taken.append(control)
    except BaseException:
        for served in taken:
            served.release()
        raise
    return agent, control


def _activated_sockets(
    socket_path: Path, control_path: Path, taken: list[ServedSocket]
) -> dict[str, ServedSocket]:
    """What systemd passed us (also added to ``taken``), by role: named ``agent`` and
    ``control``, or else found at our paths."""
    by_path = {socket_path: _systemd.AGENT_FD_NAME, control_path: _systemd.CONTROL_FD_NAME}
    found: dict[str, ServedSocket] = {}
    for name, fd in _systemd.listen_fds(os.environ, os.getpid()):
        path, sock = _systemd.listening_unix_socket(name, fd)
        taken.append(served := ServedSocket.activated(path, sock))
        role = name if name in by_path.values() else by_path.get(path)
        if role is None or role in found:
            raise _systemd.ActivationError(
                f"systemd passed a socket this daemon has no use for: {name} at {path} "
                f"(name one {_systemd.AGENT_FD_NAME} and one {_systemd.CONTROL_FD_NAME})"
            )
        found[role] = served
    return found
