"""``switcher``: the top-level parser and the dispatch to each command's module."""

from __future__ import annotations

from switcher import __version__
from switcher.cli import _control_args, _daemon_args
from switcher.cli._exit import EXIT_OK
from switcher.cli._parser import Parser

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence


def _build_parser() -> Parser:
    parser = Parser(
        prog="switcher",
        description="A stable SSH agent socket that follows your live forwarded sessions.",
    )
    parser.add_argument("--version", action="version", version=f"switcher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _daemon_args.add_parsers(commands)
    _control_args.add_parsers(commands)
    return parser


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
