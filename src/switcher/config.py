"""The daemon's configuration: one frozen value, built once from the command line."""

from __future__ import annotations

from pathlib import Path

import attrs

# Seconds open connections get to finish after SIGTERM before being cut:
# enough for an in-flight signature, short enough for a service manager.
DEFAULT_GRACE = 2.0


def default_agents_dirs() -> tuple[str, ...]:
    """Where OpenSSH puts forwarded agents: ~/.ssh/agent (10.1+), then /tmp (before 10.1)."""
    return (str(Path.home() / ".ssh" / "agent"), "/tmp")  # noqa: S108


@attrs.frozen
class Config:
    socket_path: Path
    control_path: Path
    agents_dirs: tuple[str, ...]
    probe_interval: float
    probe_timeout: float
    log_level: str = "info"
    log_file: Path | None = None
    grace: float = DEFAULT_GRACE
    # How often directory mtimes are checked for new sessions (not a flag:
    # tests stretch it to take the watcher out of the picture).
    watch_interval: float = 0.25
    # $NOTIFY_SOCKET when systemd runs us as a Type=notify service: where
    # READY=1 and STOPPING=1 go. None without systemd.
    notify_socket: str | None = None
