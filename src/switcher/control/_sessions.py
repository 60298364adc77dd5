"""What control says about session affinity: ``why``, and who each agent serves in ``list``.

Pure functions of affinity's decisions and surveys and of registry
snapshots; the server does the looking.
"""

from __future__ import annotations

from typing import Any

from switcher.core import Decision, Served, Snapshot


def why_reply(
    pid: int, decision: Decision, snapshot: Snapshot, *, affinity: bool
) -> dict[str, Any]:
    """Which agent a client of ``pid`` would get now, how it was chosen, and each step."""
    agent = decision.backend or snapshot.choice
    steps = list(decision.steps)
    if not affinity:
        steps.insert(0, "affinity is off (--affinity off): the pin or the ranking decides")
    return {
        "ok": True,
        "pid": pid,
        "affinity": affinity,
        "chosen_by": decision.chosen_by.value,
        "agent": agent.id if agent is not None else None,
        "path": agent.path if agent is not None else None,
        "tmux_client": decision.tmux_client,
        "session_sshd_pid": decision.sshd_pid,
        "steps": steps,
    }


def served_json(served: Served) -> dict[str, Any]:
    """The ``sessions`` and ``tmux_clients`` fields of one backend in ``list``."""
    return {
        "sessions": [
            {"sshd_pid": s.sshd_pid, "shell_pid": s.shell_pid, "tty": s.tty}
            for s in served.sessions
        ],
        "tmux_clients": [
            {"tty": c.tty, "pid": c.pid, "activity": c.activity, "socket": c.socket}
            for c in served.tmux_clients
        ],
    }


def with_sessions(reply: dict[str, Any], served: dict[str, Served]) -> dict[str, Any]:
    """A ``list`` reply whose backends also say which sessions and tmux clients they serve."""
    empty = Served()
    for backend in reply["backends"]:
        backend.update(served_json(served.get(backend["id"], empty)))
    return reply
