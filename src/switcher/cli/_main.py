from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from switcher import __version__
from switcher.cli import _control_args
from switcher.cli._configdefault import ConfigDefault
from switcher.cli._exit import EXIT_OK

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, NoReturn

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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {text!r}")
    return value


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


def _columns() -> int:
    """The terminal's width for help text, as shutil.get_terminal_size would say."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):
        return 80


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, given its width so it need not import shutil.

    argparse builds a formatter for every add_argument, and without a width
    it imports shutil (and with it bz2 and lzma): a few milliseconds of every
    `switcher` command's start-up, for a number only --help uses.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)

    # {config.NAME} in help text stands for Config's default for NAME, read
    # only when help is printed (see switcher.cli._configdefault).

    def _format_text(self, text: str) -> str:
        return super()._format_text(_config_defaults(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return _config_defaults(super()._expand_help(action))


def _config_defaults(text: str) -> str:
    return re.sub(r"\{config\.(\w+)\}", lambda m: str(ConfigDefault(m[1])), text)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, through add_subparsers, its subparsers) using _HelpFormatter,
    whose errors name an unknown flag and show the usage of the command it was given to.

    argparse leaves a subcommand's unknown flags to the top-level parser (top-level
    usage), and reports a missing command before an unknown flag that came first.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["formatter_class"] = _HelpFormatter
        super().__init__(*args, **kwargs)
        self._given: list[str] = []
        self._commands: argparse.Action | None = None

    def add_subparsers(self, **kwargs: Any) -> Any:
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_command_line(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """Parse ``argv``; an unknown flag is reported by the command it was given to."""
        args, unknown = self.parse_known_args(argv)
        if unknown:
            self._chosen(args).error(f"unrecognized arguments: {' '.join(unknown)}")
        return args

    def _chosen(self, args: argparse.Namespace) -> _Parser:
        """The parser of the (sub)command ``args`` were parsed for, the deepest one."""
        if self._commands is not None:
            chosen = getattr(args, self._commands.dest, None)
            parsers: dict[str, _Parser] = getattr(self._commands, "choices", {})
            if chosen in parsers:
                return parsers[chosen]._chosen(args)  # noqa: SLF001 (a _Parser, like self)
        return self

    def error(self, message: str) -> NoReturn:
        unknown = [
            word
            for word in self._given
            if word.startswith("-") and word.split("=", 1)[0] not in self._option_string_actions
        ]
        if unknown and message.startswith("the following arguments are required"):
            message = f"unrecognized arguments: {' '.join(unknown)}"
        super().error(message)


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="switcher",
        description="A stable SSH agent socket that follows your live forwarded sessions.",
    )
    parser.add_argument("--version", action="version", version=f"switcher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    _add_daemon_options(daemon, keep_defaults=True)

    init = commands.add_parser(
        "init",
        help="print shell code for a login script: start the daemon, set SSH_AUTH_SOCK",
        description="Print code that starts `switcher daemon --daemon` and exports "
        "SSH_AUTH_SOCK when the daemon is up, for eval in a login script.",
        epilog=_INIT_EPILOG,
    )
    init.add_argument("shell", choices=("bash", "zsh", "fish"))
    forwarded = _add_daemon_options(init, keep_defaults=False)
    init.set_defaults(forward=tuple((a.dest, a.option_strings[0]) for a in forwarded))

    commands.add_parser(
        "path",
        help="print the agent socket path",
        description='Print the stable socket path, for: export SSH_AUTH_SOCK="$(switcher path)"',
    ).add_argument("--socket-path", type=_path, default=None, help=argparse.SUPPRESS)
    _control_args.add_parsers(commands)
    return parser


def _add_daemon_options(
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
            type=_positive_seconds,
            default=from_config("probe_interval"),
            metavar="SECONDS",
            help="how often every agent is probed (default: {config.probe_interval})",
        ),
        parser.add_argument(
            "--probe-timeout",
            type=_positive_seconds,
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_command_line(argv)
    if args.command == "path":
        from switcher import paths

        print(args.socket_path or paths.default_socket_path())
        return EXIT_OK
    if args.command == "daemon":
        return _daemon(args)
    if args.command == "init":
        from switcher.cli._init import run as init

        return init(args)
    if args.command == "ctl":
        from switcher.cli._ctl import run as ctl

        return ctl(args)
    if args.command == "stop":
        from switcher.cli._stop import run as stop

        return stop(args)
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


def _daemon(args: argparse.Namespace) -> int:
    # Loaded here, not at the top: `switcher path` and `ctl` need none of it.
    from switcher.cli._daemon import run

    return run(args)
