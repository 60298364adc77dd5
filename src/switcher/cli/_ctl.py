"""``switcher ctl``: its six commands, each one request (or a watch) and its output.

Standard library only, like everything `switcher ctl` loads: a tmux status
line or a shell prompt may run it every few seconds. The connection is
``_control_client``'s; the text for people is ``_render``'s.
"""

from __future__ import annotations

import os
import sys
import time

from switcher import __version__
from switcher.cli import _render
from switcher.cli._control_client import ClientError, Connection, Daemon, check
from switcher.cli._exit import EXIT_INTERRUPTED, EXIT_OK, fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from switcher.cli._control_client import Reply


class _StdoutClosedError(Exception):
    """Whoever read our output (``| head``, a status bar) has gone away."""


def run(args: argparse.Namespace) -> int:
    """Carry out ``switcher ctl``; return the exit status."""
    command = _COMMANDS[args.ctl_command]
    try:
        with Connection.open(Daemon(args.control_path, args.socket_path)) as connection:
            command(connection, args)
    except ClientError as exc:
        fail(str(exc))
        return exc.status
    except _StdoutClosedError:
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK if args.ctl_command == "watch" else EXIT_INTERRUPTED
    return EXIT_OK


def _emit(text: str) -> None:
    """Print and flush at once, so output works in a pipe and in a status bar."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise _StdoutClosedError from None


def _rendered(render: Callable[[Reply], str], reply: Reply) -> str:
    """Render a reply for people; a reply of an unexpected shape is an error, not a traceback."""
    try:
        return render(reply)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ClientError(
            "the daemon's reply does not have the expected shape "
            f"(is it a different version than this client, {__version__}?)"
        ) from None


def _json_or_human(
    connection: Connection, args: argparse.Namespace, render: Callable[[Reply], str], cmd: str
) -> None:
    text, reply = connection.request(cmd)
    if args.json:
        _emit(text)
        check(reply)
        return
    check(reply)
    _emit(_rendered(render, reply))


def _list(connection: Connection, args: argparse.Namespace) -> None:
    _json_or_human(connection, args, lambda reply: _render.render_list(reply, time.time()), "list")


def _status(connection: Connection, args: argparse.Namespace) -> None:
    _json_or_human(connection, args, _render.render_status, "status")


def _refresh(connection: Connection, args: argparse.Namespace) -> None:
    _json_or_human(connection, args, _render.render_refresh, "refresh")


def _prefer(connection: Connection, args: argparse.Namespace) -> None:
    if args.clear:
        text, reply = connection.request("prefer", clear=True)
    else:
        text, reply = connection.request("prefer", id=args.id)
    if args.json:
        _emit(text)
        check(reply)
        return
    check(reply)
    listing: Reply | None = None
    if reply.get("pinned") is not None:
        # The reply names the pinned id only; its path and health are in `list`.
        # The pin is made either way, so a failure here only shortens the message.
        try:
            _, listing = connection.request("list")
        except ClientError:
            listing = None
    _emit(_rendered(lambda r: _render.render_prefer(r, listing), reply))


def _watch(connection: Connection, args: argparse.Namespace) -> None:
    text, reply = connection.request("watch")
    if args.json:
        _emit(text)
    check(reply)
    if not args.json:
        _emit(f"{_render.clock()} {_rendered(_render.render_watching, reply)}")
    connection.stop_timing_out()
    while (received := connection.receive()) is not None:
        text, event = received
        if args.json:
            _emit(text)
        if "event" in event:
            if not args.json:
                _emit(f"{_render.clock()} {_rendered(_render.render_event, event)}")
        else:
            check(event)  # an error line ends the watch; other non-events are not for us


def _why(connection: Connection, args: argparse.Namespace) -> None:
    # Without a pid: the shell `switcher ctl why` was typed in, our parent.
    pid = args.pid if args.pid is not None else os.getppid()
    text, reply = connection.request("why", pid=pid)
    if args.json:
        _emit(text)
        check(reply)
        return
    check(reply)
    _emit(_rendered(_render.render_why, reply))


_COMMANDS: dict[str, Callable[[Connection, argparse.Namespace], None]] = {
    "list": _list,
    "prefer": _prefer,
    "refresh": _refresh,
    "status": _status,
    "watch": _watch,
    "why": _why,
}
