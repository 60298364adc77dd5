from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from switcher import __version__, paths
from switcher.cli import _ctl

# Exit codes of `switcher daemon`, documented in --help and the README.
EXIT_OK = 0
EXIT_REFUSED = 1  # an unsafe or unusable path, or another start-up failure
EXIT_USAGE = 2  # argparse's own code for bad flags
EXIT_ALREADY_RUNNING = 3

_DAEMON_EPILOG = """\
exit status:
  0  stopped cleanly (SIGINT, SIGTERM or SIGQUIT); SIGHUP never stops it
  1  refused to start: an unsafe or unusable socket path, or root without
     --allow-root (the reason is printed)
  2  bad command-line flags
  3  another switcher is already serving this socket path
"""


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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switcher",
        description="A stable SSH agent socket that follows your live forwarded sessions.",
    )
    parser.add_argument("--version", action="version", version=f"switcher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    daemon = commands.add_parser(
        "daemon",
        help="run the agent proxy in the foreground",
        description="Serve a stable agent socket and relay each connection to the best live "
        "forwarded agent.",
        epilog=_DAEMON_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    daemon.add_argument(
        "--socket-path",
        type=Path,
        default=None,
        help="the stable agent socket (default: /tmp/switcher-$UID/agent.sock)",
    )
    daemon.add_argument(
        "--control-path",
        type=Path,
        default=None,
        help="the JSON control socket (default: /tmp/switcher-$UID/control.sock)",
    )
    daemon.add_argument(
        "--agents-dirs",
        type=_agents_dirs,
        default=None,
        metavar="DIR[:DIR...]",
        help="where to look for forwarded agents (default: $HOME/.ssh/agent:/tmp)",
    )
    daemon.add_argument(
        "--log-file", type=Path, default=None, help="append JSON log lines here (default: stderr)"
    )
    daemon.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    daemon.add_argument(
        "--allow-root",
        action="store_true",
        help="run even as root (root's daemon relays only root's agents; usually a mistake)",
    )
    daemon.add_argument(
        "--probe-interval",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how often every backend is probed (default: 5)",
    )
    daemon.add_argument(
        "--probe-timeout",
        type=_positive_seconds,
        default=2.0,
        metavar="SECONDS",
        help="a probe unanswered this long marks its backend slow (default: 2)",
    )

    commands.add_parser(
        "path",
        help="print the agent socket path",
        description='Print the stable socket path, for: export SSH_AUTH_SOCK="$(switcher path)"',
    ).add_argument("--socket-path", type=Path, default=None, help=argparse.SUPPRESS)
    _ctl.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "path":
        print(args.socket_path or paths.default_socket_path())
        return EXIT_OK
    if args.command == "daemon":
        return _daemon(args)
    if args.command == "ctl":
        return _ctl.run(args)
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


def _daemon(args: argparse.Namespace) -> int:
    # Loaded here, not at the top: only the daemon needs the event loop.
    from switcher.cli._daemon import run  # noqa: PLC0415

    return run(args)


def fail(message: str) -> None:
    """One line on stderr, in the shape users grep for."""
    print(f"switcher: {message}", file=sys.stderr)
