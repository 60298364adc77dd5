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
