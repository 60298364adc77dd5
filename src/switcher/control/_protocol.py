"""The control protocol, sans I/O: lines in, commands out; replies to bytes.

One JSON object per line each way (docs/control-protocol.md). Nothing here
touches a socket, so every rule about bad input is tested on plain bytes.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from switcher import CONTROL_PROTOCOL_VERSION

# A request is a few dozen bytes; 64 KiB is generous and still bounds what
# one client can make us buffer.
MAX_LINE = 64 * 1024


class ControlError(Exception):
    """A request we refuse; ``code`` is stable, ``message`` is for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def reply(self) -> dict[str, Any]:
        return {"ok": False, "error": {"code": self.code, "message": self.message}}


class LineFramer:
    """Splits a byte stream into lines of at most ``max_line`` bytes."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # bytes already known to hold no newline

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """The next whole line, without its newline; None if none is complete yet."""
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buffer)
            if self._scanned > self._max_line:
                raise ControlError("line_too_long", f"request line exceeds {self._max_line} bytes")
            return None
        if end > self._max_line:
            raise ControlError("line_too_long", f"request line exceeds {self._max_line} bytes")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        return line


@attrs.frozen
class ListCommand:
    pass


@attrs.frozen
class PreferCommand:
    target: str | None  # None clears the pin


@attrs.frozen
class RefreshCommand:
    pass


@attrs.frozen
class StatusCommand:
    pass


@attrs.frozen
class WatchCommand:
    pass


@attrs.frozen
class StopCommand:
    pass


@attrs.frozen
class WhyCommand:
    pid: int  # the process whose agent choice to explain


Command = (
    ListCommand
    | PreferCommand
    | RefreshCommand
    | StatusCommand
    | WatchCommand
    | StopCommand
    | WhyCommand
)

_NO_ARGUMENTS: dict[str, Command] = {
    "list": ListCommand(),
    "refresh": RefreshCommand(),
    "status": StatusCommand(),
    "watch": WatchCommand(),
    "stop": StopCommand(),
}
_ENVELOPE = frozenset({"v", "cmd"})


def parse_request(line: bytes) -> Command:
    """Turn one request line into a command, or raise :class:`ControlError`."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError("bad_json", f"request is not valid JSON: {_short(exc)}") from None
    if not isinstance(value, dict):
        raise ControlError("not_an_object", "request must be a JSON object")
    version = value.get("v")
    if type(version) is not int or version != CONTROL_PROTOCOL_VERSION:
        raise ControlError(
            "unsupported_version",
            f"unsupported protocol version {_show(version)}; "
            f"this daemon speaks {CONTROL_PROTOCOL_VERSION}",
        )
    cmd = value.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError("unknown_command", "request needs a string 'cmd'")
    arguments = set(value) - _ENVELOPE
    if cmd in _NO_ARGUMENTS:
        if arguments:
            raise ControlError("bad_argument", f"{cmd} takes no arguments, got {_names(arguments)}")
        return _NO_ARGUMENTS[cmd]
    if cmd == "prefer":
        return _parse_prefer(value, arguments)
    if cmd == "why":
        return _parse_why(value, arguments)
    raise ControlError("unknown_command", f"unknown command {_show(cmd)}")


def _parse_prefer(value: dict[str, Any], arguments: set[str]) -> PreferCommand:
    if arguments - {"id", "clear"}:
        raise ControlError(
            "bad_argument", f"prefer got unexpected {_names(arguments - {'id', 'clear'})}"
        )
    if "clear" in value:
        if value["clear"] is not True or "id" in value:
            raise ControlError("bad_argument", "prefer takes either 'id' or \"clear\": true")
        return PreferCommand(None)
    target = value.get("id")
    if not isinstance(target, str) or not target:
        raise ControlError(
            "bad_argument", "prefer needs a non-empty string 'id' (or \"clear\": true)"
        )
    return PreferCommand(target)


def _parse_why(value: dict[str, Any], arguments: set[str]) -> WhyCommand:
    if arguments - {"pid"}:
        raise ControlError("bad_argument", f"why got unexpected {_names(arguments - {'pid'})}")
    pid = value.get("pid")
    if type(pid) is not int or pid <= 0:
        raise ControlError("bad_argument", "why needs a positive integer 'pid'")
    return WhyCommand(pid)


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply line: compact JSON and a newline."""
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


def _short(exc: Exception) -> str:
    # json's messages quote positions, never content; keep them to one line.
    return str(exc).splitlines()[0][:100]


def _show(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _names(names: set[str]) -> str:
    return ", ".join(sorted(_show(n) for n in names))
