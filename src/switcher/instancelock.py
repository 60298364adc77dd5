"""The instance lock: at most one daemon per socket path.

``flock`` on a lock file (where ``paths.lock_path`` says) makes "is a daemon
running here, and may I replace a stale socket" one atomic question. The
kernel drops the lock when the process dies, however it dies; a clean stop
also removes the file. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from switcher.paths import fd_identity, file_identity, lock_path, runtime_dir
from switcher.pathsafety import UnsafePathError, ensure_private_dir


class AlreadyRunningError(Exception):
    """Another switcher already serves this socket path."""


# A lock file removed by the daemon that held it, between our open and our
# flock, leaves us holding a lock on a file nobody else will find: we try
# again on the new file. More than a few rounds means something is wrong.
_LOCK_ATTEMPTS = 5


def lock_for(path: Path) -> int:
    """Take the instance lock that guards a socket path; return its descriptor.

    The lock (``flock`` on the file ``lock_path`` names) makes "is a daemon
    running here, and may I replace a stale socket" one atomic question, so
    two logins racing to start switcher cannot both unlink and bind. The
    kernel drops the lock when the process dies, however it dies; a daemon
    that stops cleanly also removes the file (``unlock``).
    """
    lock = lock_path(path)
    if lock.parent == runtime_dir():
        ensure_private_dir(lock.parent)
    for _ in range(_LOCK_ATTEMPTS):
        fd = _open_and_lock(path, lock)
        if file_identity(lock) == fd_identity(fd):
            return fd
        os.close(fd)  # the file we locked was removed meanwhile: lock the new one
    raise UnsafePathError(f"lock file {lock} keeps being replaced")


def _open_and_lock(path: Path, lock: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(lock, flags, 0o600)
    except OSError as exc:
        raise UnsafePathError(f"cannot open lock file {lock}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"lock file {lock} is not a regular file of ours")  # noqa: TRY301 (the fd is closed below)
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


def unlock(path: Path, fd: int) -> None:
    """Remove the lock file of ``path`` (if it is still the one ``fd`` locks), then release it.

    Removed while still locked: whoever opened it meanwhile finds, once it
    has the lock, that the file is gone, and locks the new one instead.
    """
    lock = lock_path(path)
    if file_identity(lock) == fd_identity(fd):
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
    os.close(fd)
