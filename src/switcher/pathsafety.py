"""The checks that make a place safe for switcher's files, and the directories it creates.

A socket, a lock or a log in a directory another user controls would hand
them our agent, or let them block or redirect us: each check here refuses
such a place with a one-line reason (``UnsafePathError``) rather than
repairing it. Standard library only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from switcher.paths import MAX_SOCKET_PATH_BYTES


class UnsafePathError(Exception):
    """A path switcher would use is not safe or not usable; the message says why in one line."""


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
