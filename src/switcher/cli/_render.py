"""What `switcher ctl` prints for people: pure functions from the daemon's replies to text.

Easy to test and to read; nothing here does I/O. ``--json`` skips all of it
and prints the replies as the daemon sent them.
"""

from __future__ import annotations

import json
import time

from switcher import __version__

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from switcher.cli._control_client import Reply

_LIST_HEADER = (
    "ID",
    "KIND",
    "HEALTH",
    "KEYS",
    "LATENCY",
    "AGE",
    "SERVED/FAILED",
    "PATH",
    "REASON",
)
# Numbers read best right-aligned: KEYS, LATENCY, AGE.
_LIST_RIGHT_ALIGNED = frozenset({3, 4, 5})


def render_list(reply: Reply, now: float) -> str:
    """The table of ``switcher ctl list``, with ``*`` in front of the current choice."""
    backends: list[Reply] = reply["backends"]
    choice = reply.get("choice")
    pinned = reply.get("pinned")
    if not backends:
        return "no agents found"
    rows = [_LIST_HEADER]
    rows.extend(
        (
            str(backend["id"]),
            # Daemons from before local agents send no kind: all theirs are forwarded.
            str(backend.get("kind", "forwarded")),
            str(backend["health"]),
            _or_dash(backend.get("keys")),
            format_latency(backend.get("probe_latency_ms")),
            # A local agent whose socket is missing has no age.
            format_age(now - float(backend["appeared"])) if backend["appeared"] else "-",
            f"{backend['served']}/{backend['failed']}",
            str(backend["path"]),
            str(backend["reason"]),
        )
        for backend in backends
    )
    markers = [" "] + ["*" if backend["id"] == choice else " " for backend in backends]
    lines = []
    aligned = _align(rows, _LIST_RIGHT_ALIGNED)
    for index, (marker, line) in enumerate(zip(markers, aligned, strict=True)):
        lines.append(f"{marker} {line}")
        if index:
            lines.extend(f"      {served}" for served in _served(backends[index - 1], now))
    if pinned is not None:
        lines.append(f"pinned: {pinned}")
    if choice is None:
        lines.append("no usable agent right now")
    return "\n".join(lines)


def _served(backend: Reply, now: float) -> list[str]:
    """Under an agent in ``list``: the SSH sessions and tmux clients it serves."""
    lines = []
    for session in backend.get("sessions", ()):
        sshd = f"sshd {session['sshd_pid']}" if session.get("sshd_pid") else "sshd unknown"
        tty = f", {session['tty']}" if session.get("tty") else ""
        lines.append(f"ssh session: {sshd}{tty} (login shell {session['shell_pid']})")
    for client in backend.get("tmux_clients", ()):
        ago = format_age(now - float(client["activity"]))
        lines.append(f"tmux client {client['tty']}, active {ago} ago")
    return lines


def render_why(reply: Reply) -> str:
    """Each step of the rule, then the agent it comes to."""
    lines = [str(step) for step in reply["steps"]]
    if reply.get("agent") is None:
        lines.append("=> no usable agent right now")
    else:
        lines.append(f"=> agent {reply['agent']} ({reply['path']}), chosen by {reply['chosen_by']}")
    return "\n".join(lines)


# The protocol's field names say `backends` (docs/control-protocol.md); people read "agents".
_STATUS_LABELS = {"backends": "agents"}


def render_status(reply: Reply) -> str:
    """``key: value`` lines, in the daemon's order."""
    lines = []
    for key, value in reply.items():
        if key == "ok":
            continue
        if key == "uptime_s":
            lines.append(f"uptime: {format_duration(float(value))}")
        elif key == "affinity":
            lines.append(f"affinity: {'on' if value else 'off'}")
        else:
            lines.append(f"{_STATUS_LABELS.get(key, key)}: {_status_value(value)}")
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


def clock() -> str:
    """The time of day that starts each ``watch`` line."""
    return time.strftime("%H:%M:%S")
