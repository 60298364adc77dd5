"""The daemon's configuration: one frozen value, built once from the command line.

Each default is written here, once, in the attrs fields: the command line
passes on only the flags that were given, and its help text reads the rest
from here (lazily: attrs is too heavy for the commands that must start
instantly, so they load this module only to print help).
"""

from __future__ import annotations

from pathlib import Path

import attrs


def default_agents_dirs() -> tuple[str, ...]:
    """Where OpenSSH puts forwarded agents: ~/.ssh/agent (10.1+), then /tmp (before 10.1)."""
    return (str(Path.home() / ".ssh" / "agent"), "/tmp")  # noqa: S108


@attrs.frozen
class Config:
    socket_path: Path
    control_path: Path
    agents_dirs: tuple[str, ...] = attrs.field(factory=default_agents_dirs)
    # Every agent is re-probed this often: a dead session is noticed within
    # it (new ones sooner, by the directory watch), and a probe is one small
    # request, so this costs the agents nothing noticeable.
    probe_interval: float = 5.0
    # A probe unanswered this long marks its agent slow (ranked below the
    # healthy ones): longer than any network round trip, shorter than a
    # hardware-key touch or a confirmation prompt.
    probe_timeout: float = 2.0
    # Local agents (--local-agent, expanded), in the order given: used only
    # while no forwarded agent is healthy or slow.
    local_agents: tuple[str, ...] = ()
    log_level: str = "info"
    # json, console, or auto: console when stderr is a terminal and there is
    # no log file (a person is watching), JSON lines otherwise.
    log_format: str = "auto"
    # Session affinity (--affinity): prefer the agent of the client's own
    # session, or of the tmux client last used, over the ranking's choice.
    affinity: bool = True
    log_file: Path | None = None
    # Seconds open connections get to finish after SIGTERM before being cut:
    # enough for an in-flight signature, short enough for a service manager.
    grace: float = 2.0
    # Whether inotify tells the daemon about new sessions and its own
    # sockets' removal (not a flag: tests turn it off so that only the probe
    # cycle, misses and refreshes notice anything).
    watch: bool = True
    # $NOTIFY_SOCKET when systemd runs us as a Type=notify service: where
    # READY=1 and STOPPING=1 go. None without systemd.
    notify_socket: str | None = None


def default_of(name: str) -> object:
    """The default of Config's field ``name`` (a factory's value for a factory)."""
    default: object = attrs.fields_dict(Config)[name].default
    factory = getattr(default, "factory", None)  # an attrs.Factory
    return factory() if callable(factory) else default
