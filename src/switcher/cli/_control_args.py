"""The command lines of ``switcher ctl`` and ``switcher stop``: the commands that talk to a daemon.

Every `switcher` command builds the whole parser, so this module is loaded
by all of them: it needs nothing but argparse, and leaves the socket client
and the rendering to the commands that run (``_ctl``, ``_stop``).
"""

from __future__ import annotations

import argparse

from switcher.cli._parser import positive_seconds

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    Subparsers = argparse._SubParsersAction[Any]  # noqa: SLF001

# How long `switcher stop` waits for the daemon to be gone: the daemon gives
# open connections 2 s (Config.grace) before it cuts them, then releases its
# sockets and exits; five times that means it is wedged.
DEFAULT_STOP_TIMEOUT_S = 10.0

_CTL_EPILOG = """\
--json output is the daemon's own, described in docs/control-protocol.md.

Which daemon: --control-path names its control socket; without it,
--socket-path names its agent socket and the control socket is found from
that (the same rule the daemon follows); without either, the default daemon.

exit status:
  0  done (watch: also after Ctrl-C or when the daemon stops)
  1  the daemon refused the request (the reason is printed), or answered nonsense
  2  bad command-line flags
  3  no daemon listens on the control path
"""

_STOP_EPILOG = """\
The daemon stops as it does on SIGTERM: it stops accepting, gives open
connections {config.grace} s to finish, removes its sockets and exits. This command
returns once it has exited.

Which daemon: as for `switcher ctl` (--control-path, or --socket-path, or
the default daemon).

exit status:
  0  the daemon has stopped
  1  it refused, or did not stop within --timeout (the reason is printed)
  2  bad command-line flags
  3  no daemon listens on the control path
"""


def _add_target_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--control-path and --socket-path: which daemon to talk to.

    Given on `ctl` itself they default to None. Repeated on each ctl command
    (so `switcher ctl list --socket-path P` works too) they default to
    SUPPRESS: a sub-parser's default would otherwise overwrite the value
    given before the command. Plain strings: pathlib would cost start-up
    time for nothing.
    """
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--control-path",
        default=default,
        metavar="PATH",
        help="the daemon's control socket (default: found from --socket-path, "
        "else /tmp/switcher-$UID/control.sock)",
    )
    parser.add_argument(
        "--socket-path",
        default=default,
        metavar="PATH",
        help="the daemon's agent socket, to find its control socket by "
        "(default: /tmp/switcher-$UID/agent.sock)",
    )


def _add_ctl_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    _add_target_options(parser, suppress=suppress)
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print the daemon's replies as JSON lines",
    )


def add_parsers(subparsers: Subparsers) -> None:
    """Register ``switcher ctl`` (and its commands) and ``switcher stop``."""
    _add_ctl(subparsers)
    stop = subparsers.add_parser(
        "stop",
        help="stop a running daemon, as SIGTERM does, and wait until it has exited",
        description="Ask a running switcher daemon to stop, and wait until it has exited "
        "and its socket is gone.",
        epilog=_STOP_EPILOG,
    )
    _add_target_options(stop, suppress=False)
    stop.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_STOP_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long to wait for it to exit (default: {DEFAULT_STOP_TIMEOUT_S:g})",
    )


def _add_ctl(subparsers: Subparsers) -> None:
    ctl = subparsers.add_parser(
        "ctl",
        help="ask a running daemon what it is doing, or tell it which agent to prefer",
        description="Talk to a running switcher daemon over its control socket.",
        epilog=_CTL_EPILOG,
        # The top-level parser's class (see _parser.Parser) sets the formatter.
    )
    _add_ctl_options(ctl, suppress=False)
    commands = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    def add(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = commands.add_parser(
            name, help=summary, description=description
        )
        _add_ctl_options(command, suppress=True)
        return command

    add(
        "list",
        "the agents in rank order; * marks the one in use",
        "The forwarded agents in rank order; * marks the one new connections use.",
    )
    prefer = add(
        "prefer",
        "pin an agent (prefer ID), or unpin (prefer --clear)",
        "Pin an agent: new connections use it first while it is healthy or slow.",
    )
    target = prefer.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "id", nargs="?", metavar="ID", help="an id, a unique id prefix, or the agent's socket path"
    )
    target.add_argument("--clear", action="store_true", help="remove the pin")
    add(
        "refresh",
        "rescan and probe every agent now; say what changed",
        "Rescan the agents dirs and probe every agent now, and say what changed.",
    )
    add("status", "the daemon's state and counters", "The daemon's state and counters.")
    add(
        "watch",
        "one line per change, until Ctrl-C",
        "One line per change (agents, health, pin, choice) as it happens, until Ctrl-C.",
    )
    why = add(
        "why",
        "which agent a process would get, and why, step by step",
        "Which agent a client started by process PID would get now, and each step of "
        "session affinity's rule that led there.",
    )
    why.add_argument(
        "pid",
        nargs="?",
        type=_pid,
        metavar="PID",
        help="the process (default: the shell this command runs in)",
    )


def _pid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return value
