"""What each control command does to (or reads from) the registry.

Synchronous where it can be: describing backends, resolving a ``prefer``
target and diffing two snapshots into watch events are pure functions of
registry snapshots.
"""

from __future__ import annotations

from typing import Any

from switcher.control._protocol import ControlError
from switcher.core import Backend, Health, Kind, RefreshReport, Registry, Snapshot


def rank_reason(backend: Backend, snapshot: Snapshot) -> str:
    """Why ``backend`` sits where it does in the ranking, in a few words."""
    if snapshot.find(backend.id) is None:
        return "removed: its socket is gone"
    pinned = backend.id == snapshot.pinned
    if backend.health is Health.DEAD:
        reason = f"dead: {backend.last_error or 'unreachable'}"
        return f"{reason} (pin ignored while dead)" if pinned else reason
    if backend.health is Health.LOOP:
        return f"loop: {backend.last_error or 'leads back to switcher'}, never used"
    if backend.health is Health.UNKNOWN:
        return "unknown: not probed yet" + (" (pin waits for a probe)" if pinned else "")
    if pinned:
        return "pinned"
    if backend.kind is Kind.LOCAL:
        return f"{backend.health.value}, local: last resort"
    if backend.health is Health.SLOW:
        return f"slow: {backend.last_error or 'no answer in time'}"
    same_health = [
        b
        for b in snapshot.backends
        if b.health is backend.health and b.id != snapshot.pinned and b.kind is backend.kind
    ]
    newest = max(same_health, key=lambda b: b.appeared)
    return "healthy, newest" if newest.id == backend.id else "healthy, older session"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def backend_json(backend: Backend, snapshot: Snapshot) -> dict[str, Any]:
    return {
        "id": backend.id,
        "path": backend.path,
        "kind": backend.kind.value,
        "layout": backend.layout.value,
        "health": backend.health.value,
        "reason": rank_reason(backend, snapshot),
        "appeared": backend.appeared,
        "last_probe": backend.last_probe,
        "probe_latency_ms": _ms(backend.probe_latency),
        "last_success": backend.last_success,
        "last_error": backend.last_error,
        "keys": backend.key_count,
        "served": backend.served,
        "failed": backend.failed,
        "pinned": backend.id == snapshot.pinned,
    }


def choice_id(snapshot: Snapshot) -> str | None:
    choice = snapshot.choice
    return choice.id if choice is not None else None


def list_reply(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "ok": True,
        "choice": choice_id(snapshot),
        "pinned": snapshot.pinned,
        "backends": [backend_json(b, snapshot) for b in snapshot.backends],
    }


def resolve(snapshot: Snapshot, target: str) -> Backend:
    """Find a backend by id, unique id prefix, or path; only registry entries qualify."""
    for backend in snapshot.backends:
        if target in (backend.id, backend.path):
            return backend
    matches = [b for b in snapshot.backends if b.id.startswith(target)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        ids = ", ".join(sorted(b.id for b in matches))
        raise ControlError("ambiguous", f"{target!r} matches several agents: {ids}")
    raise ControlError("not_found", f"no agent {target!r} (see: switcher ctl list)")


def prefer(registry: Registry, target: str | None) -> dict[str, Any]:
    path = None
    if target is None:
        registry.pin(None)
    else:
        backend = resolve(registry.snapshot(), target)
        registry.pin(backend.id)
        path = backend.path
    snapshot = registry.snapshot()
    return {"ok": True, "pinned": snapshot.pinned, "path": path, "choice": choice_id(snapshot)}


def refresh_reply(report: RefreshReport, snapshot: Snapshot) -> dict[str, Any]:
    return {
        "ok": True,
        "added": [backend_json(b, snapshot) for b in report.added],
        "removed": [backend_json(b, snapshot) for b in report.removed],
        "health_changes": [
            {"id": c.backend.id, "from": c.previous.value, "to": c.backend.health.value}
            for c in report.health_changes
        ],
        "choice": choice_id(snapshot),
    }


def diff_events(old: Snapshot, new: Snapshot) -> list[dict[str, Any]]:
    """Watch events that take a watcher from ``old`` to ``new``."""
    events: list[dict[str, Any]] = []
    before = {b.id: b for b in old.backends}
    after = {b.id: b for b in new.backends}
    events.extend(
        {"event": "backend_added", "backend": backend_json(backend, new)}
        for backend in new.backends
        if backend.id not in before
    )
    events.extend(
        {"event": "backend_removed", "id": backend.id, "path": backend.path}
        for backend in old.backends
        if backend.id not in after
    )
    for backend in new.backends:
        previous = before.get(backend.id)
        if previous is not None and previous.health is not backend.health:
            events.append(
                {
                    "event": "health_changed",
                    "id": backend.id,
                    "from": previous.health.value,
                    "to": backend.health.value,
                }
            )
    if old.pinned != new.pinned:
        events.append({"event": "pin_changed", "pinned": new.pinned})
    if choice_id(old) != choice_id(new):
        events.append(
            {"event": "choice_changed", "choice": choice_id(new), "previous": choice_id(old)}
        )
    return events
