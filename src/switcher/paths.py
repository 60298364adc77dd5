"""Where switcher keeps its sockets, and the checks that make a place safe.

Standard library only: ``switcher path``, ``switcher ctl`` and the
already-running check import this without loading trio or structlog.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

# Linux's sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

AGENT_SOCKET_NAME = "agent.sock"
CONTROL_SOCKET_NAME = "control.sock"


class UnsafePathError(Exception):
    """A path switcher would use is not safe or not usable; the message says why in one line."""


class AlreadyRunningError(Exception):
    """Another switcher already serves this socket path."""


def runtime_dir(uid: int | None = None) -> Path:
    """``/tmp/switcher-$UID``: the private directory for switcher's sockets.

    Like tmux's ``/tmp/tmux-$UID``, it lives in ``/tmp`` (not ``$XDG_RUNTIME_DIR``)
    because that is what survives logout on hosts without lingering systemd
    user sessions, and the whole point is to outlive the SSH session.
    """
    return Path("/tmp") / f"switcher-{os.getuid() if uid is None else uid}"  # noqa: S108


def default_socket_path() -> Path:
    return runtime_dir() / AGENT_SOCKET_NAME


def default_control_path() -> Path:
    return runtime_dir() / CONTROL_SOCKET_NAME


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700 if missing, then insist it is ours and private.

    The checks are tmux's for ``/tmp/tmux-$UID``: a real directory (not a
    symlink someone planted), owned by us, with no group or other bits.
    Anything else is refused rather than repaired, because "repairing" a
    directory another user controls would hand them our socket.
    """
    try:
        path.mkdir(mode=0o700)
        # mkdir's mode is filtered by the umask (the daemon runs under 0o177,
        # which would leave the directory without its search bit): set it.
        path.chmod(0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafePathError(f"cannot create {path}: {exc.strerror}") from None
    try:
        st = path.lstat()
    except OSError as exc:
        raise UnsafePathError(f"cannot inspect {path}: {exc.strerror}") from None
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{path} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a directory")
    if st.st_uid != uid:
        raise UnsafePathError(f"{path} is owned by uid {st.st_uid}, not by us (uid {uid})")
    if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
        raise UnsafePathError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700 (chmod 700 it)"
        )
    if st.st_mode & 0o077:
        raise UnsafePathError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be "
            "accessible to group or others (chmod 700 it)"
        )


def check_parent_dir(path: Path) -> None:
    """A socket's directory must not let other users replace the socket.

    Used for ``--socket-path`` outside switcher's own runtime directory: the
    parent must be owned by us or root, and if others can write to it, it
    must be sticky (like ``/tmp``), so nobody else can unlink or rename our
    socket.
    """
    parent = path.parent
    try:
        st = parent.stat()
    except OSError as exc:
        raise UnsafePathError(f"cannot use directory {parent}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{parent} is not a directory")
    if st.st_uid not in (0, os.getuid()):
        raise UnsafePathError(f"{parent} is owned by uid {st.st_uid}, neither us nor root")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafePathError(
            f"{parent} is writable by group or others and not sticky; "
            "another user could replace the socket"
        )


def prepare_socket_dir(path: Path, *, default_dir: Path) -> None:
    """Make the directory of a socket path ready, with the checks that fit it."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise UnsafePathError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes, "
            "the limit of a Unix socket address"
        )
    if path.parent == default_dir:
        ensure_private_dir(default_dir)
    else:
        check_parent_dir(path)


def socket_answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
        return True


def lock_for(path: Path) -> int:
    """Take the instance lock that guards a socket path; return its descriptor.

    The lock (``flock`` on ``PATH.lock``) makes "is a daemon running here,
    and may I replace a stale socket" one atomic question, so two logins
    racing to start switcher cannot both unlink and bind. The kernel drops
    the lock when the process dies, however it dies.
    """
    lock_path = path.with_name(path.name + ".lock")
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(lock_path, flags, 0o600)
    except OSError as exc:
        raise UnsafePathError(f"cannot open lock file {lock_path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"lock file {lock_path} is not a regular file of ours")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunningError(
                    f"another switcher is already running for {path}"
                ) from None
            raise
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    """Bind and listen on ``path`` with mode 0600, whatever the process umask is."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UnsafePathError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock
