"""Where switcher keeps its sockets and files: the default places, and which file is which.

Standard library only, like everything the commands that must start
instantly load (see CONTRIBUTING.md, "The start-up budget").
"""

from __future__ import annotations

import os
from pathlib import Path

from switcher import _defaults

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# Linux's sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

AGENT_SOCKET_NAME = _defaults.AGENT_SOCKET_NAME
CONTROL_SOCKET_NAME = _defaults.CONTROL_SOCKET_NAME
PID_FILE_NAME = "switcher.pid"
LOG_FILE_NAME = "switcher.log"


def runtime_dir(uid: int | None = None) -> Path:
    """``/tmp/switcher-$UID``: the private directory for switcher's sockets (see _defaults)."""
    return Path(_defaults.runtime_dir(uid))


def default_socket_path() -> Path:
    return runtime_dir() / AGENT_SOCKET_NAME


def default_control_path() -> Path:
    return runtime_dir() / CONTROL_SOCKET_NAME


def control_path_for(socket_path: Path) -> Path:
    """The control socket of the daemon on ``socket_path`` when none is given (see _defaults)."""
    return Path(_defaults.control_path_for(os.fspath(socket_path)))


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


def file_identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what is at ``path`` now (not following a symlink), or None."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def fd_identity(fd: int) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of the file open at ``fd``: compared with ``file_identity``."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)
