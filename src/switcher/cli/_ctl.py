"""``switcher ctl``: talk to a running daemon over its control socket.

Standard library only, like ``switcher path``: a tmux status line or a shell
prompt may run this every few seconds, so it must not pay for importing trio,
structlog or attrs. The wire format is docs/control-protocol.md: one JSON
object per line each way.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from switcher import __version__, _defaults
from switcher.cli._exit import EXIT_INTERRUPTED, EXIT_NO_DAEMON, EXIT_OK, EXIT_REFUSED

# json, shlex, socket and time are imported where they are used: this module
# is loaded by every `switcher` command (for its argument parser), and those
# imports would cost `switcher path` and `switcher daemon --daemon` start-up
# time they do not need.

# Not `from typing import TYPE_CHECKING`: importing typing costs `switcher ctl`
# a few milliseconds of its start-up (benchmarks/startup.py), and mypy and
# ruff recognise the name alone.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence
    from types import TracebackType
    from typing import Any, Self

    Subparsers = argparse._SubParsersAction[Any]  # noqa: SLF001
    # A JSON object as the daemon sent it (docs/control-protocol.md).
    Reply = dict[str, Any]

# Exit codes of `switcher ctl`, listed in its --help.
EXIT_FAILED = EXIT_REFUSED  # the daemon refused the request, or the conversation went wrong

# The only version of docs/control-protocol.md there is.
PROTOCOL_VERSION = 1
# A reply describes every backend, so it may be far longer than the daemon's
# 64 KiB limit on requests; this bound only keeps a confused peer from
# filling our memory.
MAX_REPLY_BYTES = 16 * 1024 * 1024
# A local daemon accepts at once or not at all; only a wedged one makes us wait.
CONNECT_TIMEOUT_S = 5.0
# `refresh` probes every backend and waits for the answers, and probes give up
# after a few seconds; a minute without a reply means the daemon is wedged.
# Never applied to watch events, which may be hours apart.
REPLY_TIMEOUT_S = 60.0
# How much of an unreadable reply to quote in the error message.
EXCERPT_CHARS = 60

_CTL_EPILOG = """\
--json output is the daemon's own, described in docs/control-protocol.md.

exit status:
  0  done (watch: also after Ctrl-C or when the daemon stops)
  1  the daemon refused the request (the reason is printed), or answered nonsense
  2  bad command-line flags
  3  no daemon listens on the control path
"""


class CtlError(Exception):
    """A failure reported as one ``switcher: ...`` line on stderr, with its exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class _StdoutClosedError(Exception):
    """Whoever read our output (``| head``, a status bar) has gone away."""


# --- the command line ------------------------------------------------------


def _add_shared_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Given on `ctl` itself they default to None/False. Repeated on each
    # command (so `switcher ctl list --json` works too) they default to
    # SUPPRESS: a sub-parser's default would otherwise overwrite the value
    # given before the command.
    parser.add_argument(
        "--control-path",
        # A plain string: pathlib would cost start-up time for nothing.
        default=argparse.SUPPRESS if suppress else None,
        metavar="PATH",
        help="the daemon's control socket (default: /tmp/switcher-$UID/control.sock)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print the daemon's replies as JSON lines",
    )


def add_parser(subparsers: Subparsers) -> None:
    """Register ``switcher ctl`` and its commands on the top-level subparsers."""
    ctl = subparsers.add_parser(
        "ctl",
        help="ask a running daemon what it is doing, or tell it which agent to prefer",
        description="Talk to a running switcher daemon over its control socket.",
        epilog=_CTL_EPILOG,
        # The top-level parser's class (see _main._Parser) sets the formatter.
    )
    _add_shared_options(ctl, suppress=False)
    commands = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    def add(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = commands.add_parser(
            name, help=summary, description=description
        )
        _add_shared_options(command, suppress=True)
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


def run(args: argparse.Namespace) -> int:
    """Carry out ``switcher ctl``; return the exit status."""
    path: str = os.fspath(args.control_path or _defaults.control_path())
    command = _COMMANDS[args.ctl_command]
    try:
        with _Connection.open(path) as connection:
            command(connection, args)
    except CtlError as exc:
        print(f"switcher: {exc}", file=sys.stderr)
        return exc.status
    except _StdoutClosedError:
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK if args.ctl_command == "watch" else EXIT_INTERRUPTED
    return EXIT_OK


# --- the conversation ------------------------------------------------------


class _Connection:
    """One control connection: requests out, JSON lines back."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self._sock = sock
        self._reader = sock.makefile("rb")

    @classmethod
    def open(cls, path: str) -> Self:
        import socket  # noqa: PLC0415 (see the note on imports at the top)

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            raise _connect_error(path, exc) from None
        sock.settimeout(REPLY_TIMEOUT_S)
        return cls(path, sock)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._reader.close()
        self._sock.close()

    def request(self, cmd: str, **arguments: object) -> tuple[str, Reply]:
        """Send one request and return its reply, as text and as an object."""
        import json  # noqa: PLC0415 (see the note on imports at the top)

        line = json.dumps({"v": PROTOCOL_VERSION, "cmd": cmd, **arguments}) + "\n"
        try:
            self._sock.sendall(line.encode())
        except (BrokenPipeError, ConnectionResetError):
            # It may have said why before closing (`busy`): read that below.
            pass
        except OSError as exc:
            raise CtlError(f"cannot talk to the daemon at {self.path}: {exc.strerror}") from None
        reply = self.receive()
        if reply is None:
            raise CtlError(f"the daemon at {self.path} closed the connection without replying")
        return reply

    def stop_timing_out(self) -> None:
        """From now on wait for lines however long they take (watch events)."""
        self._sock.settimeout(None)

    def receive(self) -> tuple[str, Reply] | None:
        """The next line, as text and as an object; None if the daemon closed cleanly."""
        try:
            data = self._reader.readline(MAX_REPLY_BYTES + 1)
        except TimeoutError:
            raise CtlError(
                f"the daemon at {self.path} did not reply within {REPLY_TIMEOUT_S:g} s"
            ) from None
        except ConnectionResetError:
            data = b""
        except OSError as exc:
            raise CtlError(f"lost the daemon at {self.path}: {exc.strerror}") from None
        if not data:
            return None
        if not data.endswith(b"\n"):
            if len(data) > MAX_REPLY_BYTES:
                raise CtlError(
                    f"the daemon at {self.path} sent a line longer than {MAX_REPLY_BYTES} bytes"
                )
            raise CtlError(f"the daemon at {self.path} closed the connection in mid-reply")
        try:
            text = data.decode()
            import json  # noqa: PLC0415 (see the note on imports at the top)

            value = json.loads(text)
        except ValueError:
            excerpt = data.decode(errors="replace").strip()[:EXCERPT_CHARS]
            raise CtlError(
                f"the daemon at {self.path} sent a reply that is not JSON: {excerpt!r}"
            ) from None
        if not isinstance(value, dict):
            raise CtlError(f"the daemon at {self.path} sent a reply that is not a JSON object")
        return text.rstrip("\n"), value


def _connect_error(path: str, exc: OSError) -> CtlError:
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        # ENOENT: never started; ECONNREFUSED: a socket file left by one that died.
        if path == _defaults.control_path():
            start = "switcher daemon"
        else:
            import shlex  # noqa: PLC0415 (see the note on imports at the top)

            start = f"switcher daemon --control-path {shlex.quote(os.fspath(path))}"
        return CtlError(f"no daemon at {path} (start one with: {start})", EXIT_NO_DAEMON)
    if isinstance(exc, TimeoutError) or exc.errno == errno.EAGAIN:
        # Linux refuses a Unix-socket connect with EAGAIN when the backlog is full.
        return CtlError(f"the daemon at {path} is not accepting connections")
    return CtlError(f"cannot connect to {path}: {exc.strerror or exc}")


def _check(reply: Reply) -> None:
    """Raise the daemon's own message if it refused the request."""
    ok = reply.get("ok")
    if ok is True:
        return
    if ok is False:
        error = reply.get("error")
        if isinstance(error, dict):
            for field in ("message", "code"):
                if isinstance(error.get(field), str) and error[field]:
                    raise CtlError(error[field])
        raise CtlError("the daemon refused the request without saying why")
    raise CtlError("the daemon sent a reply without an ok field")


def _emit(text: str) -> None:
    """Print and flush at once, so output works in a pipe and in a status bar."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise _StdoutClosedError from None


def _render(render: Callable[[Reply], str], reply: Reply) -> str:
    """Render a reply for people; a reply of an unexpected shape is an error, not a traceback."""
    try:
        return render(reply)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CtlError(
            "the daemon's reply does not have the expected shape "
            f"(is it a different version than this client, {__version__}?)"
        ) from None


# --- the commands ----------------------------------------------------------


def _json_or_human(
    connection: _Connection, args: argparse.Namespace, render: Callable[[Reply], str], cmd: str
) -> None:
    text, reply = connection.request(cmd)
    if args.json:
        _emit(text)
        _check(reply)
        return
    _check(reply)
    _emit(_render(render, reply))


def _list(connection: _Connection, args: argparse.Namespace) -> None:
    import time  # noqa: PLC0415 (see the note on imports at the top)

    _json_or_human(connection, args, lambda reply: render_list(reply, time.time()), "list")


def _status(connection: _Connection, args: argparse.Namespace) -> None:
    _json_or_human(connection, args, render_status, "status")


def _refresh(connection: _Connection, args: argparse.Namespace) -> None:
    _json_or_human(connection, args, render_refresh, "refresh")


def _prefer(connection: _Connection, args: argparse.Namespace) -> None:
    if args.clear:
        text, reply = connection.request("prefer", clear=True)
    else:
        text, reply = connection.request("prefer", id=args.id)
    if args.json:
        _emit(text)
        _check(reply)
        return
    _check(reply)
    listing: Reply | None = None
    if reply.get("pinned") is not None:
        # The reply names the pinned id only; its path and health are in `list`.
        # The pin is made either way, so a failure here only shortens the message.
        try:
            _, listing = connection.request("list")
        except CtlError:
            listing = None
    _emit(_render(lambda r: render_prefer(r, listing), reply))


def _watch(connection: _Connection, args: argparse.Namespace) -> None:
    text, reply = connection.request("watch")
    if args.json:
        _emit(text)
    _check(reply)
    if not args.json:
        _emit(f"{_clock()} {_render(render_watching, reply)}")
    connection.stop_timing_out()
    while (received := connection.receive()) is not None:
        text, event = received
        if args.json:
            _emit(text)
        if "event" in event:
            if not args.json:
                _emit(f"{_clock()} {_render(render_event, event)}")
        else:
            _check(event)  # an error line ends the watch; other non-events are not for us


_COMMANDS: dict[str, Callable[[_Connection, argparse.Namespace], None]] = {
    "list": _list,
    "prefer": _prefer,
    "refresh": _refresh,
    "status": _status,
    "watch": _watch,
}


# --- rendering for people --------------------------------------------------
# Pure functions from a reply to text, so they are easy to test and to read.

_LIST_HEADER = ("ID", "HEALTH", "KEYS", "LATENCY", "AGE", "SERVED/FAILED", "PATH", "REASON")
# Numbers read best right-aligned: KEYS, LATENCY, AGE.
_LIST_RIGHT_ALIGNED = frozenset({2, 3, 4})


def render_list(reply: Reply, now: float) -> str:
    """The table of ``switcher ctl list``, with ``*`` in front of the current choice."""
    backends: list[Reply] = reply["backends"]
    choice = reply.get("choice")
    pinned = reply.get("pinned")
    if not backends:
        return "no forwarded agents found"
    rows = [_LIST_HEADER]
    rows.extend(
        (
            str(backend["id"]),
            str(backend["health"]),
            _or_dash(backend.get("keys")),
            format_latency(backend.get("probe_latency_ms")),
            format_age(now - float(backend["appeared"])),
            f"{backend['served']}/{backend['failed']}",
            str(backend["path"]),
            str(backend["reason"]),
        )
        for backend in backends
    )
    markers = [" "] + ["*" if backend["id"] == choice else " " for backend in backends]
    lines = [
        f"{marker} {line}"
        for marker, line in zip(markers, _align(rows, _LIST_RIGHT_ALIGNED), strict=True)
    ]
    if pinned is not None:
        lines.append(f"pinned: {pinned}")
    if choice is None:
        lines.append("no usable agent right now")
    return "\n".join(lines)


def render_status(reply: Reply) -> str:
    """``key: value`` lines, in the daemon's order."""
    lines = []
    for key, value in reply.items():
        if key == "ok":
            continue
        if key == "uptime_s":
            lines.append(f"uptime: {format_duration(float(value))}")
        else:
            lines.append(f"{key}: {_status_value(value)}")
    if reply.get("version", __version__) != __version__:
        lines.append(f"client_version: {__version__}")
    return "\n".join(lines)


def render_prefer(reply: Reply, listing: Reply | None) -> str:
    """What ``prefer`` did, and whether the pinned agent is the one in use."""
    pinned = reply["pinned"]
    choice = reply.get("choice")
    if pinned is None:
        return "pin cleared"
    backend = _find(listing, pinned)
    if backend is None:
        return f"pinned {pinned}"
    line = f"pinned {pinned} ({backend['path']})"
    if choice == pinned:
        return line
    instead = f"new connections use {choice}" if choice is not None else "no agent is usable"
    return f"{line}\nit is {backend['health']}, so {instead} until it recovers"


def render_refresh(reply: Reply) -> str:
    """What the rescan changed, then the current choice."""
    lines = [f"added {b['id']} ({b['health']}) {b['path']}" for b in reply["added"]]
    lines.extend(f"removed {b['id']} {b['path']}" for b in reply["removed"])
    lines.extend(f"{c['id']}: {c['from']} -> {c['to']}" for c in reply["health_changes"])
    if not lines:
        lines.append("nothing changed")
    lines.append(f"choice: {_or_none(reply.get('choice'))}")
    return "\n".join(lines)


def render_watching(reply: Reply) -> str:
    """The first line of ``watch``."""
    return f"watching; choice {_or_none(reply.get('choice'))}"


def render_event(event: Reply) -> str:
    """One ``watch`` event as one line (without the timestamp)."""
    kind = event["event"]
    if kind == "backend_added":
        backend = event["backend"]
        return f"added {backend['id']} ({backend['health']}) {backend['path']}"
    if kind == "backend_removed":
        return f"removed {event['id']} {event['path']}"
    if kind == "health_changed":
        return f"{event['id']}: {event['from']} -> {event['to']}"
    if kind == "pin_changed":
        pinned = event["pinned"]
        return "pin cleared" if pinned is None else f"pinned {pinned}"
    if kind == "choice_changed":
        return f"choice {_or_none(event['choice'])} (was {_or_none(event.get('previous'))})"
    # An event newer than this client: show it rather than drop it.
    rest = {k: v for k, v in event.items() if k != "event"}
    import json  # noqa: PLC0415 (see the note on imports at the top)

    return f"{kind} {json.dumps(rest, separators=(',', ':'))}"


def format_age(seconds: float) -> str:
    """How long ago, in the largest whole unit: 5s, 3m, 2h, 4d."""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def format_duration(seconds: float) -> str:
    """An uptime in its two largest units: 42s, 3m 5s, 1h 0m, 4d 2h."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def format_latency(ms: float | None) -> str:
    """A probe's latency: one decimal below 10 ms, whole milliseconds above; - if none."""
    if ms is None:
        return "-"
    return f"{ms:.1f}ms" if ms < 10 else f"{ms:.0f}ms"


def _align(rows: Sequence[tuple[str, ...]], right_aligned: frozenset[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(width) if i in right_aligned else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _find(listing: Reply | None, backend_id: str) -> Reply | None:
    if listing is None or listing.get("ok") is not True:
        return None
    return next((b for b in listing.get("backends", ()) if b.get("id") == backend_id), None)


def _status_value(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(_status_value(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={_status_value(v)}" for k, v in value.items())
    return str(value)


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _or_none(value: object) -> str:
    return "none" if value is None else str(value)


def _clock() -> str:
    import time  # noqa: PLC0415 (see the note on imports at the top)

    return time.strftime("%H:%M:%S")
