"""The flags of ``switcher daemon`` and ``switcher init`` (which passes them on), and ``path``.

Defaults are Config's (see _configdefault); help text names them as
``{config.NAME}``, filled in only when help is printed.
"""

from __future__ import annotations

import argparse
import os

from switcher.cli._configdefault import ConfigDefault
from switcher.cli._parser import positive_seconds

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

_DAEMON_EPILOG = """\
With --daemon it returns once the daemon listens, and at once (status 0,
starting nothing) when a switcher already serves the socket path; the
daemon runs on without a terminal and logs to
$XDG_STATE_HOME/switcher/switcher.log (~/.local/state/switcher/...).

signals:
  SIGINT, SIGTERM, SIGQUIT  stop accepting, give open connections {config.grace} s, exit 0
  SIGHUP                    reopen the log file (logrotate) and re-probe every
                            agent; it never stops the daemon

systemd: started with sockets passed by systemd (LISTEN_FDS, names "agent"
and "control") it serves those; with NOTIFY_SOCKET it reports READY=1 and
STOPPING=1. See contrib/systemd/.

exit status:
  0  stopped cleanly; with --daemon: the daemon is up (just started, or
     already running)
  1  refused to start, with the reason on one line: an unsafe or unusable
     socket path, log file or pid file, root without --allow-root, or
     sockets from systemd it cannot use
  2  bad command-line flags
  3  another switcher is already serving this socket path (in the
     foreground; --daemon exits 0 instead)
"""

_INIT_EPILOG = """\
Add one line to your login script:
  bash  ~/.bash_profile               eval "$(switcher init bash)"
  zsh   ~/.zprofile                   eval "$(switcher init zsh)"
  fish  ~/.config/fish/config.fish    switcher init fish | source
As root, add --allow-root before the shell:
  eval "$(switcher init --allow-root bash)"
(a root daemon relays root's own agents, so that is never implied).

The code starts `switcher daemon --daemon` (which returns at once when it is
already running) and sets SSH_AUTH_SOCK only if a socket of yours is there;
otherwise it leaves SSH_AUTH_SOCK alone and prints one warning line. Daemon
flags given here are passed on to the daemon.
"""


def _path(text: str) -> Path:
    # pathlib is loaded only when a path flag is given: `switcher ctl`, run
    # by status lines every few seconds, needs none of it.
    from pathlib import Path

    return Path(text)


def _agents_dirs(text: str) -> tuple[str, ...]:
    dirs = tuple(d for d in text.split(":") if d)
    if not dirs:
        raise argparse.ArgumentTypeError("give at least one directory")
    relative = [d for d in dirs if not os.path.isabs(d)]
    if relative:
        raise argparse.ArgumentTypeError(f"directories must be absolute: {relative[0]!r}")
    return dirs


def _local_agent(text: str) -> str:
    """A --local-agent path: a leading ~ and $XDG_RUNTIME_DIR expanded, absolute."""
    path = os.path.expanduser(text)
    for var in ("${XDG_RUNTIME_DIR}", "$XDG_RUNTIME_DIR"):
        if var in path:
            runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
            if not runtime_dir:
                raise argparse.ArgumentTypeError(f"XDG_RUNTIME_DIR is not set: {text!r}")
            path = path.replace(var, runtime_dir)
    if not os.path.isabs(path):
        raise argparse.ArgumentTypeError(
            f"must be absolute (only ~ and $XDG_RUNTIME_DIR are expanded): {text!r}"
        )
    return os.path.normpath(path)


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``daemon``, ``init`` and ``path`` on the top-level subparsers."""
    daemon = commands.add_parser(
        "daemon",
        help="run the agent proxy (in the foreground, or detached with --daemon)",
        description="Serve a stable agent socket and relay each connection to the best live "
        "forwarded agent.",
        epilog=_DAEMON_EPILOG,
    )
    daemon.add_argument(
        "--daemon",
        action="store_true",
        help="detach and run in the background; return once it listens, or at once if a "
        "switcher already serves the socket path",
    )
    add_daemon_options(daemon, keep_defaults=True)

    init = commands.add_parser(
        "init",
        help="print shell code for a login script: start the daemon, set SSH_AUTH_SOCK",
        description="Print code that starts `switcher daemon --daemon` and exports "
        "SSH_AUTH_SOCK when the daemon is up, for eval in a login script.",
        epilog=_INIT_EPILOG,
    )
    init.add_argument("shell", choices=("bash", "zsh", "fish"))
    forwarded = add_daemon_options(init, keep_defaults=False)
    init.set_defaults(forward=tuple((a.dest, a.option_strings[0]) for a in forwarded))

    commands.add_parser(
        "path",
        help="print the agent socket path",
        description='Print the stable socket path, for: export SSH_AUTH_SOCK="$(switcher path)"',
    ).add_argument("--socket-path", type=_path, default=None, help=argparse.SUPPRESS)


def add_daemon_options(
    parser: argparse.ArgumentParser, *, keep_defaults: bool
) -> list[argparse.Action]:
    """The daemon's flags. ``init`` takes them too, without defaults: it passes on what is given."""

    def default(value: object) -> object:
        return value if keep_defaults else argparse.SUPPRESS

    def from_config(field: str) -> object:
        return default(ConfigDefault(field))

    return [
        parser.add_argument(
            "--socket-path",
            type=_path,
            default=default(None),
            metavar="PATH",
            help="the stable agent socket (default: /tmp/switcher-$UID/agent.sock)",
        ),
        parser.add_argument(
            "--control-path",
            type=_path,
            default=default(None),
            metavar="PATH",
            help="the JSON control socket (default: /tmp/switcher-$UID/control.sock, or "
            "control-<hash>.sock there for another --socket-path)",
        ),
        parser.add_argument(
            "--agents-dirs",
            type=_agents_dirs,
            default=from_config("agents_dirs"),
            metavar="DIR[:DIR...]",
            help="where to look for forwarded agents (default: {config.agents_dirs})",
        ),
        parser.add_argument(
            "--local-agent",
            type=_local_agent,
            action="append",
            default=default(None),
            metavar="PATH",
            help="a local agent's socket, used only while no forwarded agent is healthy or "
            "slow; repeat for more, tried in the order given. A leading ~ and "
            "$XDG_RUNTIME_DIR are expanded",
        ),
        parser.add_argument(
            "--log-file",
            type=_path,
            default=default(None),
            metavar="PATH",
            help="append JSON log lines here (default: stderr; with --daemon: "
            "$XDG_STATE_HOME/switcher/switcher.log)",
        ),
        parser.add_argument(
            "--log-level",
            choices=("debug", "info", "warning", "error"),
            default=from_config("log_level"),
            metavar="LEVEL",
            help="log events this severe and worse: debug, info, warning or error "
            "(default: {config.log_level})",
        ),
        parser.add_argument(
            "--log-format",
            choices=("json", "console", "auto"),
            default=from_config("log_format"),
            metavar="FORMAT",
            help="json (one JSON object per line), console (for people), or auto: console "
            "when stderr is a terminal and there is no --log-file (default: {config.log_format})",
        ),
        parser.add_argument(
            "--pid-file",
            type=_path,
            default=default(None),
            metavar="PATH",
            help="write the daemon's pid here (default: none; with --daemon: "
            "$XDG_RUNTIME_DIR/switcher.pid, or $XDG_STATE_HOME/switcher/switcher.pid)",
        ),
        parser.add_argument(
            "--allow-root",
            action="store_true",
            default=default(False),
            help="run even as root (root's daemon relays only root's agents; usually a mistake)",
        ),
        parser.add_argument(
            "--probe-interval",
            type=positive_seconds,
            default=from_config("probe_interval"),
            metavar="SECONDS",
            help="how often every agent is probed (default: {config.probe_interval})",
        ),
        parser.add_argument(
            "--probe-timeout",
            type=positive_seconds,
            default=from_config("probe_timeout"),
            metavar="SECONDS",
            help="a probe unanswered this long marks its agent slow "
            "(default: {config.probe_timeout})",
        ),
        parser.add_argument(
            "--affinity",
            choices=("on", "off"),
            default=from_config("affinity"),
            metavar="{on,off}",
            help="give each client the agent of the session it was started from, or inside "
            "tmux of the tmux client last used (default: {config.affinity})",
        ),
    ]
