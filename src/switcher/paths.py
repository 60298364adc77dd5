"""Where switcher keeps its sockets and files, and the checks that make a place safe.

Standard library only: ``switcher path``, ``switcher ctl``, ``switcher init``
and the already-running check of ``switcher daemon --daemon`` import this
without loading trio or structlog.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from switcher import _defaults

# socket is imported where a socket is made: `switcher daemon --daemon` with a
# daemon already running stops at the lock, and should not pay for it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket

# Not `from typing import TYPE_CHECKING`: importing typing would cost the
# commands that must start instantly a few milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# Linux's sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

AGENT_SOCKET_NAME = _defaults.AGENT_SOCKET_NAME
CONTROL_SOCKET_NAME = _defaults.CONTROL_SOCKET_NAME
PID_FILE_NAME = "switcher.pid"
LOG_FILE_NAME = "switcher.log"

# Connections the kernel queues before we accept them. Logins come in
# bursts (a git operation can open dozens of agent connections), and
# queued clients cost us nothing.
LISTEN_BACKLOG = 512


class UnsafePathError(Exception):
    """A path switcher would use is not safe or not usable; the message says why in one line."""


class AlreadyRunningError(Exception):
    """Another switcher already serves this socket path."""


def runtime_dir(uid: int | None = None) -> Path:
    """``/tmp/switcher-$UID``: the private directory for switcher's sockets (see _defaults)."""
    return Path(_defaults.runtime_dir(uid))


def default_socket_path() -> Path:
    return runtime_dir() / AGENT_SOCKET_NAME


def default_control_path() -> Path:
    return runtime_dir() / CONTROL_SOCKET_NAME


def _xdg_dir(environ: Mapping[str, str], name: str) -> Path | None:
    # The XDG base directory spec: a relative value is invalid and ignored.
    value = environ.get(name, "")
    return Path(value) if os.path.isabs(value) else None


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/switcher`` (``~/.local/state/switcher`` without it): the log file."""
    env = os.environ if environ is None else environ
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return (_xdg_dir(env, "XDG_STATE_HOME") or home / ".local" / "state") / "switcher"


def default_pid_file(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_RUNTIME_DIR/switcher.pid``, or in the state dir when there is no runtime dir."""
    env = os.environ if environ is None else environ
    runtime = _xdg_dir(env, "XDG_RUNTIME_DIR")
    return runtime / PID_FILE_NAME if runtime is not None else state_dir(env) / PID_FILE_NAME


def default_log_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``switcher daemon --daemon`` logs unless told otherwise."""
    return state_dir(environ) / LOG_FILE_NAME


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700 (what XDG asks for its dirs).

    Directories that exist are left as they are: they are the user's.
    """
    if path.is_dir():
        return
    make_private_dirs(path.parent)
    try:
        path.mkdir()
        path.chmod(0o700)  # mkdir's mode is filtered by the umask: set it
    except FileExistsError:
        pass  # another start-up made it in the meantime
    except OSError as exc:
        raise UnsafePathError(f"cannot create directory {path}: {exc.strerror}") from None


def write_pid_file(path: Path, pid: int) -> None:
    """Write ``pid`` to ``path``, mode 0600, replacing it whole: a reader never sees half."""
    temporary = path.with_name(f".{path.name}.{pid}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)
        temporary.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise UnsafePathError(f"cannot write pid file {path}: {exc.strerror}") from None


def remove_pid_file(path: Path, pid: int) -> None:
    """Remove the pid file if it still names ``pid`` (a newer daemon may have replaced it)."""
    try:
        if path.read_text().strip() == str(pid):
            path.unlink()
    except (OSError, UnicodeDecodeError):
        pass


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
    _check_ancestors(parent)


def _check_ancestors(parent: Path) -> None:
    """Nobody else may be able to swap the directory under us, higher up either.

    Every directory on the way to ``parent``, as written and as resolved,
    must be ours or root's, and sticky if others may write to it: otherwise
    its owner could replace a symlink on the way, or rename our directory
    away and put theirs in its place, and clients would reach their socket.
    """
    resolved = Path(os.path.realpath(parent))
    seen: set[Path] = set()
    for ancestor in [parent, *parent.parents, resolved, *resolved.parents]:
        if ancestor in seen:
            continue
        seen.add(ancestor)
        try:
            st = ancestor.lstat()
        except OSError as exc:
            raise UnsafePathError(f"cannot inspect {ancestor}: {exc.strerror}") from None
        if st.st_uid not in (0, os.getuid()):
            raise UnsafePathError(
                f"{ancestor} is owned by uid {st.st_uid}, neither us nor root; "
                "its owner could redirect the socket"
            )
        if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafePathError(
                f"{ancestor} is writable by group or others and not sticky; "
                "another user could redirect the socket"
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
    import socket  # noqa: PLC0415 (see the note on imports at the top)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
        return True


def lock_path(path: Path) -> Path:
    """Where the instance lock of a socket path lives.

    Beside the socket (``PATH.lock``) when the socket's directory is ours
    alone; otherwise (an explicit ``--socket-path`` in ``/tmp``, say) in
    switcher's private runtime directory, named by a hash of the socket
    path: a lock file in a directory others can write could be planted
    there in advance, or left behind to block another user's daemon on the
    same path.
    """
    if _is_private_dir(path.parent):
        return path.with_name(path.name + ".lock")
    return runtime_dir() / f"lock-{_defaults.path_tag(os.fspath(path))}.lock"


def _is_private_dir(directory: Path) -> bool:
    """Whether only we can add or remove files in ``directory``."""
    try:
        st = directory.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


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
        if _identity(lock) == _fd_identity(fd):
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
    if _identity(lock) == _fd_identity(fd):
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
    os.close(fd)


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
    import socket  # noqa: PLC0415 (see the note on imports at the top)

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


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


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
        self.identity = _identity(path)

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
        return self.identity is not None and _identity(self.path) == self.identity

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
        if _identity(lock_path(self.path)) != _fd_identity(self.lock_fd):
            fd = lock_for(self.path)
            os.close(self.lock_fd)  # its file is gone: nothing to remove
            self.lock_fd = fd
        claim_socket_path(self.path)
        self.sock = bind_private_socket(self.path, backlog)
        self.identity = _identity(self.path)
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


def _fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)
