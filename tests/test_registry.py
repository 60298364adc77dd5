"""The registry: reconciling scans, ranking backends, pins, probes and change waiting."""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

import attrs
import pytest
import structlog
import structlog.testing
import trio
import trio.testing

from switcher.core._discovery import Candidate, Layout
from switcher.core._registry import (
    Backend,
    Health,
    HealthChange,
    ProbeResult,
    Reconciled,
    Registry,
    Snapshot,
    backend_id,
    rank_key,
)


class FakeClock:
    """A wall clock that only moves when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cand(name: str, ctime: float = 100.0, *, ino: int | None = None) -> Candidate:
    """A candidate socket named ``name``; its inode defaults to one derived from the name."""
    path = f"/tmp/ssh-{name}/agent.1"
    return Candidate(path, Layout.TMP, 1, ino if ino is not None else sum(map(ord, name)), ctime)


def bid(c: Candidate) -> str:
    return backend_id(c.path, c.dev, c.ino)


def order(registry: Registry) -> list[str]:
    """The snapshot's backends as their paths, best first."""
    return [b.path for b in registry.snapshot().backends]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    return Registry(clock=clock)


def held(registry: Registry, c: Candidate) -> Backend:
    """The registry's current backend for candidate ``c``, which must be held."""
    backend = registry.get(bid(c))
    assert backend is not None
    return backend


def set_health(registry: Registry, c: Candidate, health: Health) -> None:
    registry.record_probe(bid(c), ProbeResult(health))


class TestBackendId:
    def test_stable_and_short(self) -> None:
        """The id is eight hex digits and depends only on path, dev and inode."""
        first = backend_id("/tmp/ssh-x/agent.1", 1, 2)
        assert re.fullmatch("[0-9a-f]{8}", first)
        assert backend_id("/tmp/ssh-x/agent.1", 1, 2) == first

    def test_differs_per_socket(self) -> None:
        """A different path, device or inode gives a different id."""
        ids = {
            backend_id("/tmp/ssh-x/agent.1", 1, 2),
            backend_id("/tmp/ssh-x/agent.2", 1, 2),
            backend_id("/tmp/ssh-x/agent.1", 3, 2),
            backend_id("/tmp/ssh-x/agent.1", 1, 4),
        }
        assert len(ids) == 4

    def test_from_candidate(self) -> None:
        """A backend made from a candidate copies its identity and starts unknown."""
        c = cand("a", ctime=123.5)
        assert Backend.from_candidate(c) == Backend(
            id=bid(c), path=c.path, layout=Layout.TMP, dev=1, ino=c.ino, appeared=123.5
        )


class TestReconcile:
    def test_adds(self, registry: Registry) -> None:
        """New candidates become unknown backends and bump the version."""
        a, b = cand("a"), cand("b")
        assert registry.reconcile([a, b]) == Reconciled(
            added=(Backend.from_candidate(a), Backend.from_candidate(b)), removed=()
        )
        assert registry.version == 1
        assert {x.health for x in registry.snapshot().backends} == {Health.UNKNOWN}

    def test_keeps_state(self, registry: Registry) -> None:
        """Reconciling the same candidates again keeps each backend's state and the version."""
        a = cand("a")
        registry.reconcile([a])
        set_health(registry, a, Health.HEALTHY)
        before = registry.snapshot()
        assert registry.reconcile([a]) == Reconciled((), ())
        assert registry.snapshot() == before

    def test_removes(self, registry: Registry) -> None:
        """A candidate no longer present is removed and returned with its last state."""
        a, b = cand("a"), cand("b")
        registry.reconcile([a, b])
        set_health(registry, b, Health.HEALTHY)
        gone = held(registry, b)
        version = registry.version
        assert registry.reconcile([a]) == Reconciled(added=(), removed=(gone,))
        assert (order(registry), registry.get(bid(b)), registry.version) == (
            [a.path],
            None,
            version + 1,
        )

    def test_inode_change_replaces(self, registry: Registry) -> None:
        """A new socket at the same path (new inode) replaces the old entry with a fresh one."""
        old = cand("a", ino=10)
        new = attrs.evolve(old, ino=11, ctime=200.0)
        registry.reconcile([old])
        set_health(registry, old, Health.HEALTHY)
        stale = held(registry, old)
        assert registry.reconcile([new]) == Reconciled(
            added=(Backend.from_candidate(new),), removed=(stale,)
        )
        assert registry.snapshot().backends == (Backend.from_candidate(new),)
        assert bid(new) != bid(old)

    def test_empty(self, registry: Registry) -> None:
        """Reconciling nothing into nothing changes nothing."""
        assert (registry.reconcile([]), registry.version) == (Reconciled((), ()), 0)


class TestRanking:
    def test_health_order(self, registry: Registry) -> None:
        """Healthy ranks before slow, slow before unknown, unknown before dead, whatever the age."""
        dead, unknown, slow, healthy = (
            cand("dead", 400.0),
            cand("unknown", 300.0),
            cand("slow", 200.0),
            cand("healthy", 100.0),
        )
        registry.reconcile([dead, unknown, slow, healthy])
        set_health(registry, dead, Health.DEAD)
        set_health(registry, slow, Health.SLOW)
        set_health(registry, healthy, Health.HEALTHY)
        assert order(registry) == [healthy.path, slow.path, unknown.path, dead.path]

    def test_newer_session_first_within_state(self, registry: Registry) -> None:
        """Among backends of one health, the most recently appeared session ranks first."""
        old, mid, new = cand("old", 100.0), cand("mid", 200.0), cand("new", 300.0)
        registry.reconcile([mid, old, new])
        assert order(registry) == [new.path, mid.path, old.path]

    def test_latest_success_breaks_ties(self, registry: Registry, clock: FakeClock) -> None:
        """Between equally old sessions of one health, the latest success ranks first."""
        a, b = cand("a", 100.0), cand("b", 100.0)
        registry.reconcile([a, b])
        clock.now = 10.0
        set_health(registry, a, Health.HEALTHY)
        clock.now = 20.0
        set_health(registry, b, Health.HEALTHY)
        assert order(registry) == [b.path, a.path]
        clock.now = 30.0
        set_health(registry, a, Health.HEALTHY)
        assert order(registry) == [a.path, b.path]

    def test_some_success_beats_none(self, registry: Registry) -> None:
        """Between equally old slow sessions, one that ever succeeded ranks first."""
        never, once = cand("never", 100.0), cand("once", 100.0)
        registry.reconcile([never, once])
        set_health(registry, once, Health.HEALTHY)
        set_health(registry, once, Health.SLOW)
        set_health(registry, never, Health.SLOW)
        assert order(registry) == [once.path, never.path]

    def test_newer_healthy_session_wins(self, registry: Registry) -> None:
        """A newer healthy session is chosen over an older healthy one."""
        old, new = cand("old", 100.0), cand("new", 200.0)
        registry.reconcile([old, new])
        set_health(registry, old, Health.HEALTHY)
        set_health(registry, new, Health.HEALTHY)
        choice = registry.snapshot().choice
        assert choice is not None
        assert choice.path == new.path

    def test_newer_dead_session_loses(self, registry: Registry) -> None:
        """A newer failing (dead) session loses to an older healthy one."""
        old, new = cand("old", 100.0), cand("new", 200.0)
        registry.reconcile([old, new])
        set_health(registry, old, Health.HEALTHY)
        registry.record_failure(bid(new), "connection refused")
        choice = registry.snapshot().choice
        assert choice is not None
        assert choice.path == old.path

    def test_rank_key(self) -> None:
        """The sort key is (pin, kind and health tier, local order, -appeared, -last success)."""
        backend = Backend.from_candidate(cand("a", 50.0))
        assert rank_key(backend, None) == (1, 4, 0, -50.0, float("inf"))
        healthy = attrs.evolve(backend, health=Health.HEALTHY, last_success=7.0)
        assert rank_key(healthy, backend.id) == (0, 0, 0, -50.0, -7.0)


class TestPin:
    @pytest.fixture
    def pair(self, registry: Registry) -> tuple[Candidate, Candidate]:
        """An older and a newer healthy backend: the newer one wins unpinned."""
        old, new = cand("old", 100.0), cand("new", 200.0)
        registry.reconcile([old, new])
        set_health(registry, old, Health.HEALTHY)
        set_health(registry, new, Health.HEALTHY)
        return old, new

    def test_pin_healthy_first(self, registry: Registry, pair: tuple[Candidate, Candidate]) -> None:
        """Pinning a healthy backend ranks it first over a newer healthy one."""
        old, new = pair
        registry.pin(bid(old))
        assert (order(registry), registry.snapshot().pinned) == ([old.path, new.path], bid(old))

    def test_pin_slow_first(self, registry: Registry, pair: tuple[Candidate, Candidate]) -> None:
        """A pinned slow backend still ranks before an unpinned healthy one."""
        old, new = pair
        set_health(registry, old, Health.SLOW)
        registry.pin(bid(old))
        assert order(registry) == [old.path, new.path]

    @pytest.mark.parametrize("health", [Health.DEAD, Health.UNKNOWN])
    def test_pin_ignored_while_unusable(
        self, registry: Registry, pair: tuple[Candidate, Candidate], health: Health
    ) -> None:
        """A pin on a dead or unknown backend is kept but has no effect on the ranking."""
        old, new = pair
        set_health(registry, old, health)
        registry.pin(bid(old))
        snapshot = registry.snapshot()
        assert ([b.path for b in snapshot.backends], snapshot.pinned) == (
            [new.path, old.path],
            bid(old),
        )

    def test_pin_takes_effect_on_recovery(
        self, registry: Registry, pair: tuple[Candidate, Candidate]
    ) -> None:
        """A pin kept while its backend was dead applies again once the backend is healthy."""
        old, new = pair
        registry.record_failure(bid(old), "reset")
        registry.pin(bid(old))
        set_health(registry, old, Health.HEALTHY)
        assert order(registry) == [old.path, new.path]

    def test_pin_cleared_on_removal(
        self, registry: Registry, pair: tuple[Candidate, Candidate]
    ) -> None:
        """When the pinned backend's socket goes, the pin goes with it."""
        old, new = pair
        registry.pin(bid(old))
        registry.reconcile([new])
        assert registry.snapshot().pinned is None

    def test_pin_survives_other_removal(
        self, registry: Registry, pair: tuple[Candidate, Candidate]
    ) -> None:
        """Removing some other backend leaves the pin in place."""
        old, _ = pair
        registry.pin(bid(old))
        registry.reconcile([old])
        assert registry.snapshot().pinned == bid(old)

    def test_unpin(self, registry: Registry, pair: tuple[Candidate, Candidate]) -> None:
        """Pinning None clears the pin and restores the natural order."""
        old, new = pair
        registry.pin(bid(old))
        registry.pin(None)
        assert (order(registry), registry.snapshot().pinned) == ([new.path, old.path], None)

    @pytest.mark.usefixtures("pair")
    def test_pin_unknown_id(self, registry: Registry) -> None:
        """Pinning an id the registry does not hold raises KeyError and changes nothing."""
        version = registry.version
        with pytest.raises(KeyError):
            registry.pin("deadbeef")
        assert (registry.snapshot().pinned, registry.version) == (None, version)

    def test_same_pin_is_no_change(
        self, registry: Registry, pair: tuple[Candidate, Candidate]
    ) -> None:
        """Pinning what is already pinned does not bump the version."""
        old, _ = pair
        registry.pin(bid(old))
        version = registry.version
        registry.pin(bid(old))
        assert registry.version == version


class TestRecordProbe:
    def test_change_is_reported(self, registry: Registry, clock: FakeClock) -> None:
        """The first successful probe reports unknown -> healthy with the full new state."""
        a = cand("a")
        registry.reconcile([a])
        clock.now = 50.0
        change = registry.record_probe(bid(a), ProbeResult(Health.HEALTHY, 0.25, 3))
        expected = attrs.evolve(
            Backend.from_candidate(a),
            health=Health.HEALTHY,
            last_probe=50.0,
            probe_latency=0.25,
            last_success=50.0,
            key_count=3,
        )
        assert change == HealthChange(expected, Health.UNKNOWN)
        assert registry.get(bid(a)) == expected

    def test_no_change_reports_none(self, registry: Registry, clock: FakeClock) -> None:
        """A probe that leaves the health as it was returns None but still records the probe."""
        a = cand("a")
        registry.reconcile([a])
        set_health(registry, a, Health.HEALTHY)
        clock.now = 60.0
        version = registry.version
        assert registry.record_probe(bid(a), ProbeResult(Health.HEALTHY, 0.5)) is None
        backend = held(registry, a)
        assert (backend.last_probe, backend.last_success, backend.probe_latency) == (
            60.0,
            60.0,
            0.5,
        )
        assert registry.version == version + 1

    def test_failure_keeps_last_success(self, registry: Registry, clock: FakeClock) -> None:
        """A failed probe records its error and time but keeps the last success and key count."""
        a = cand("a")
        registry.reconcile([a])
        clock.now = 10.0
        registry.record_probe(bid(a), ProbeResult(Health.HEALTHY, 0.1, 2))
        clock.now = 20.0
        change = registry.record_probe(bid(a), ProbeResult(Health.DEAD, error="refused"))
        expected = attrs.evolve(
            Backend.from_candidate(a),
            health=Health.DEAD,
            last_probe=20.0,
            probe_latency=None,
            last_success=10.0,
            last_error="refused",
            key_count=2,
        )
        assert change == HealthChange(expected, Health.HEALTHY)

    def test_slow_keeps_last_success(self, registry: Registry, clock: FakeClock) -> None:
        """A slow probe is not a success: the last success time stays."""
        a = cand("a")
        registry.reconcile([a])
        clock.now = 10.0
        set_health(registry, a, Health.HEALTHY)
        clock.now = 20.0
        set_health(registry, a, Health.SLOW)
        backend = held(registry, a)
        assert (backend.health, backend.last_success, backend.last_probe) == (
            Health.SLOW,
            10.0,
            20.0,
        )

    def test_vanished_backend(self, registry: Registry) -> None:
        """A probe result for a backend removed meanwhile is dropped."""
        version = registry.version
        assert registry.record_probe("00000000", ProbeResult(Health.HEALTHY)) is None
        assert registry.version == version


class TestRecordFailure:
    def test_marks_dead(self, registry: Registry) -> None:
        """A proxy failure makes a healthy backend dead, counts it, and reports the change."""
        a = cand("a")
        registry.reconcile([a])
        set_health(registry, a, Health.HEALTHY)
        before = held(registry, a)
        change = registry.record_failure(bid(a), "connection reset")
        expected = attrs.evolve(before, health=Health.DEAD, last_error="connection reset", failed=1)
        assert (change, registry.get(bid(a))) == (HealthChange(expected, Health.HEALTHY), expected)

    def test_already_dead(self, registry: Registry) -> None:
        """A second failure still counts but is no health change."""
        a = cand("a")
        registry.reconcile([a])
        registry.record_failure(bid(a), "refused")
        assert registry.record_failure(bid(a), "refused again") is None
        backend = held(registry, a)
        assert (backend.health, backend.failed, backend.last_error) == (
            Health.DEAD,
            2,
            "refused again",
        )

    def test_unknown_id(self, registry: Registry) -> None:
        """A failure for a backend no longer held is ignored."""
        assert registry.record_failure("00000000", "gone") is None


class TestRecordTraffic:
    def test_counts(self, registry: Registry, clock: FakeClock) -> None:
        """Served and failed requests add up; serving any counts as a success now."""
        a = cand("a")
        registry.reconcile([a])
        clock.now = 70.0
        registry.record_traffic(bid(a), served=3, failed=1)
        registry.record_traffic(bid(a), served=2, failed=0)
        backend = held(registry, a)
        assert (backend.served, backend.failed, backend.last_success) == (5, 1, 70.0)

    def test_only_failures_keep_last_success(self, registry: Registry, clock: FakeClock) -> None:
        """A connection that served nothing does not move the last success time."""
        a = cand("a")
        registry.reconcile([a])
        clock.now = 10.0
        set_health(registry, a, Health.HEALTHY)
        clock.now = 20.0
        registry.record_traffic(bid(a), served=0, failed=2)
        backend = held(registry, a)
        assert (backend.served, backend.failed, backend.last_success) == (0, 2, 10.0)

    def test_nothing_is_no_change(self, registry: Registry) -> None:
        """A connection with no requests does not bump the version."""
        a = cand("a")
        registry.reconcile([a])
        version = registry.version
        registry.record_traffic(bid(a), served=0, failed=0)
        assert registry.version == version

    def test_unknown_id(self, registry: Registry) -> None:
        """Traffic for a backend no longer held is ignored."""
        version = registry.version
        registry.record_traffic("00000000", served=1, failed=0)
        assert registry.version == version


class TestSnapshot:
    def test_frozen(self, registry: Registry) -> None:
        """A snapshot and its backends cannot be modified."""
        registry.reconcile([cand("a")])
        snapshot = registry.snapshot()
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            snapshot.pinned = "x"  # type: ignore[misc]
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            snapshot.backends[0].health = Health.HEALTHY  # type: ignore[misc]

    def test_isolated_from_later_changes(self, registry: Registry) -> None:
        """A snapshot keeps showing the moment it was taken after the registry changes."""
        a = cand("a")
        registry.reconcile([a])
        snapshot = registry.snapshot()
        set_health(registry, a, Health.HEALTHY)
        registry.reconcile([a, cand("b")])
        assert snapshot == Snapshot((Backend.from_candidate(a),), None, 1)

    def test_usable_and_choice_exclude_dead(self, registry: Registry) -> None:
        """``usable`` lists every backend but the dead ones, best first; ``choice`` is the first."""
        dead, slow, unknown = cand("dead", 300.0), cand("slow", 100.0), cand("unknown", 200.0)
        registry.reconcile([dead, slow, unknown])
        registry.record_failure(bid(dead), "refused")
        set_health(registry, slow, Health.SLOW)
        snapshot = registry.snapshot()
        assert [b.path for b in snapshot.usable] == [slow.path, unknown.path]
        assert snapshot.choice == snapshot.usable[0]

    def test_all_dead_no_choice(self, registry: Registry) -> None:
        """With every backend dead there is nothing usable and no choice."""
        a = cand("a")
        registry.reconcile([a])
        registry.record_failure(bid(a), "refused")
        snapshot = registry.snapshot()
        assert (snapshot.usable, snapshot.choice, len(snapshot.backends)) == ((), None, 1)

    def test_empty(self, registry: Registry) -> None:
        """An empty registry's snapshot has no backends, no pin and version zero."""
        assert registry.snapshot() == Snapshot((), None, 0)

    def test_find(self, registry: Registry) -> None:
        """``find`` looks a backend up by id in the snapshot."""
        a = cand("a")
        registry.reconcile([a])
        snapshot = registry.snapshot()
        assert (snapshot.find(bid(a)), snapshot.find("00000000")) == (
            Backend.from_candidate(a),
            None,
        )


class TestWaitChanged:
    async def test_wakes_on_mutation(self, registry: Registry) -> None:
        """A waiter blocks until a mutation and then returns the new version."""
        seen: list[int] = []

        async def waiter() -> None:
            seen.append(await registry.wait_changed(registry.version))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert seen == []
                registry.reconcile([cand("a")])
        assert seen == [1]

    async def test_wakes_every_waiter(self, registry: Registry) -> None:
        """Every task waiting on the same version is woken by one change."""
        seen: list[int] = []

        async def waiter() -> None:
            seen.append(await registry.wait_changed(0))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                registry.reconcile([cand("a")])
        assert seen == [1, 1, 1]

    async def test_wakes_again_after_change(self, registry: Registry) -> None:
        """Waiting after one change blocks until the next one (the event is renewed)."""
        a = cand("a")
        registry.reconcile([a])
        seen: list[int] = []

        async def waiter() -> None:
            seen.append(await registry.wait_changed(registry.version))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert seen == []
                registry.pin(bid(a))
        assert seen == [2]

    async def test_already_changed_returns_at_once(self, registry: Registry) -> None:
        """A caller that is behind gets the current version without waiting."""
        registry.reconcile([cand("a")])
        with trio.fail_after(5):
            assert await registry.wait_changed(0) == 1


class TestHealthLog:
    """Every health change is logged once, by the registry, whoever caused it."""

    def events(self, logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
        return [e for e in logs if e["event"] == "switcher.registry.health_changed"]

    def test_a_probe_that_changes_health(self, registry: Registry) -> None:
        c = cand("a")
        registry.reconcile([c])
        with structlog.testing.capture_logs() as logs:
            registry.record_probe(bid(c), ProbeResult(Health.HEALTHY, latency=0.0012, key_count=2))
            registry.record_probe(bid(c), ProbeResult(Health.HEALTHY, latency=0.001, key_count=2))
        assert self.events(logs) == [
            {
                "event": "switcher.registry.health_changed",
                "log_level": "info",
                "backend": bid(c),
                "path": c.path,
                "previous": "unknown",
                "health": "healthy",
                "cause": "probe",
                "latency_ms": 1.2,
                "keys": 2,
                "reason": None,
            }
        ]

    def test_a_dead_backend_that_answers_a_client(self, registry: Registry) -> None:
        c = cand("a")
        registry.reconcile([c])
        registry.record_failure(bid(c), "connection refused")
        with structlog.testing.capture_logs() as logs:
            registry.record_traffic(bid(c), served=1, failed=0)
            registry.record_traffic(bid(c), served=1, failed=0)
        assert [(e["previous"], e["health"], e["cause"]) for e in self.events(logs)] == [
            ("dead", "healthy", "client_answered")
        ]

    def test_a_relay_failure(self, registry: Registry) -> None:
        c = cand("a")
        registry.reconcile([c])
        with structlog.testing.capture_logs() as logs:
            registry.record_failure(bid(c), "connection refused")
            registry.record_failure(bid(c), "connection refused")
        assert [
            (e["previous"], e["health"], e["cause"], e["reason"]) for e in self.events(logs)
        ] == [("unknown", "dead", "relay_failed", "connection refused")]

    def test_added_and_removed(self, registry: Registry) -> None:
        a, b = cand("a"), cand("b")
        registry.reconcile([a])
        with structlog.testing.capture_logs() as logs:
            registry.reconcile([b])
        assert [(e["event"], e["path"]) for e in logs] == [
            ("switcher.registry.backend_added", b.path),
            ("switcher.registry.backend_removed", a.path),
        ]
