"""Where switcher's sockets live by default, as plain strings.

Imports nothing but ``os``: `switcher ctl` (run by status lines every few
seconds) needs the control socket's path without loading pathlib.
``switcher.paths`` builds its Path-based API on these.
"""

from __future__ import annotations

import os

AGENT_SOCKET_NAME = "agent.sock"
CONTROL_SOCKET_NAME = "control.sock"


def runtime_dir(uid: int | None = None) -> str:
    """``/tmp/switcher-$UID``: the private directory for switcher's sockets.

    Like tmux's ``/tmp/tmux-$UID``, it lives in ``/tmp`` (not
    ``$XDG_RUNTIME_DIR``) because that is what survives logout on hosts
    without lingering systemd user sessions, and the whole point is to
    outlive the SSH session.
    """
    return f"/tmp/switcher-{os.getuid() if uid is None else uid}"  # noqa: S108


def control_path() -> str:
    return os.path.join(runtime_dir(), CONTROL_SOCKET_NAME)


def agent_path() -> str:
    return os.path.join(runtime_dir(), AGENT_SOCKET_NAME)


def path_tag(socket_path: str) -> str:
    """A short, stable tag naming one socket path: in the names of its control socket and lock.

    BLAKE2b from ``_blake2``, as ``hashlib.blake2b`` gives it, without
    loading ``hashlib`` (which loads OpenSSL: milliseconds of start-up).
    """
    from _blake2 import blake2b

    return blake2b(os.fsencode(socket_path), digest_size=5).hexdigest()


def control_path_for(socket_path: str) -> str:
    """The control socket of the daemon serving ``socket_path``, when none was given.

    The default agent socket keeps the default control socket. Any other
    agent socket gets a control socket of its own in the private runtime
    directory, named by a hash of its absolute path: two daemons on
    different socket paths never collide, and ``switcher ctl --socket-path``
    finds the daemon from the agent socket alone.
    """
    socket_path = os.path.abspath(socket_path)
    if socket_path == agent_path():
        return control_path()
    return os.path.join(runtime_dir(), f"control-{path_tag(socket_path)}.sock")
