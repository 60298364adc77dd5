"""The JSON control socket: protocol, commands and server (docs/control-protocol.md)."""

from switcher.control._commands import diff_events, list_reply, rank_reason
from switcher.control._protocol import (
    MAX_LINE,
    ControlError,
    LineFramer,
    encode_reply,
    parse_request,
)
from switcher.control._server import ControlService, DaemonInfo, serve_control

__all__ = [
    "MAX_LINE",
    "ControlError",
    "ControlService",
    "DaemonInfo",
    "LineFramer",
    "diff_events",
    "encode_reply",
    "list_reply",
    "parse_request",
    "rank_reason",
    "serve_control",
]
