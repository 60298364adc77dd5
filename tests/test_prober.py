"""The prober and its scanner in virtual time: scans in order, coalesced; probes on the period."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from switcher.core import (
    Candidate,
    Health,
    Layout,
    Prober,
    ProbeResult,
    Registry,
    ScanSettings,
    Watcher,
)
from switcher.core._discovery import ScanResult
from world import WakeUps


def candidate(name: str, ctime: float = 100.0) -> Candidate:
    return Candidate(f"/agents/ssh-{name}/agent.1", Layout.TMP, 1, sum(map(ord, name)), ctime)


def found(*candidates: Candidate) -> ScanResult:
    return ScanResult(candidates=candidates, skipped=(), watched=(), errors=())


SETTINGS = ScanSettings(("/agents",), uid=1000, host_hash="h")


@attrs.define(eq=False)
class ScriptedScans:
    """A scan function whose calls take the times and give the results a test scripts.

    Once the script runs out, every further call answers at once with the
    last result. ``started`` records when each call began (virtual time).
    """

    script: list[tuple[float, ScanResult]]
    last: ScanResult = attrs.Factory(found)
    started: list[float] = attrs.Factory(list)

    async def __call__(self, settings: ScanSettings) -> ScanResult:  # noqa: ARG002 (the scan's signature)
        self.started.append(trio.current_time())
        if not self.script:
            return self.last
        delay, result = self.script.pop(0)
        self.last = result
        await trio.sleep(delay)
        return result


@attrs.define(eq=False)
class ScriptedProbes:
    """A probe function: healthy after the scripted delays (then ``usual``); records start times."""

    delays: list[float] = attrs.Factory(list)
    usual: float = 0.5
    started: list[float] = attrs.Factory(list)

    async def __call__(
        self,
        path: str,  # noqa: ARG002 (the probe's signature)
        *,
        refuse_pid: int | None,  # noqa: ARG002
    ) -> ProbeResult:
        self.started.append(trio.current_time())
        await trio.sleep(self.delays.pop(0) if self.delays else self.usual)
        return ProbeResult(Health.HEALTHY, latency=0.001, key_count=1)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def serve(
    nursery: trio.Nursery,
    scans: ScriptedScans,
    probes: ScriptedProbes | None = None,
    *,
    interval: float = 3600.0,
    probe_timeout: float = 2.0,
    watcher: Watcher | None = None,
) -> Prober:
    prober = Prober(
        Registry(),
        SETTINGS,
        interval=interval,
        probe_timeout=probe_timeout,
        refuse_pid=None,
        scan_dirs=scans,
        probe_path=probes or ScriptedProbes(),
        watcher=watcher or Watcher(None),
    )
    await nursery.start(prober.serve)
    return prober


def paths(backends: Iterable[object]) -> list[str]:
    return [b.path for b in backends]  # type: ignore[attr-defined]


class TestScansInOrder:
    async def test_a_slow_stale_scan_does_not_undo_a_newer_one(
        self,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
        nursery: trio.Nursery,
    ) -> None:
        """A scan that started before a session appeared, but finishes after a
        later scan that found the session, must not remove it again."""
        new = candidate("new")
        scans = ScriptedScans([(0.0, found()), (10.0, found()), (1.0, found(new))])
        prober = await serve(nursery, scans)
        removed: list[str] = []

        async def stale() -> None:
            report = await prober.rescan()
            removed.extend(paths(report.removed))

        nursery.start_soon(stale)
        await trio.testing.wait_all_tasks_blocked()
        await prober.rescan()
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(60)
        assert (paths(prober.registry.snapshot().backends), removed) == ([new.path], [])

    async def test_a_burst_of_requests_is_one_or_two_scans(
        self,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
        nursery: trio.Nursery,
    ) -> None:
        """Ten rescans asked for at once share the scans: the one running, then one more."""
        scans = ScriptedScans([(0.0, found())] + [(1.0, found(candidate("a")))] * 10)
        prober = await serve(nursery, scans)
        async with trio.open_nursery() as burst:
            for _ in range(10):
                burst.start_soon(prober.rescan)
        assert (len(scans.started) - 1, paths(prober.registry.snapshot().backends)) == (
            1,
            [candidate("a").path],
        )

    async def test_a_rescan_reports_the_net_change_since_it_asked(
        self,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
        nursery: trio.Nursery,
    ) -> None:
        """A rescan that waits behind a running scan hears of every scan applied
        meanwhile: a session that came and went in between is in neither list."""
        brief, old = candidate("brief"), candidate("old")
        scans = ScriptedScans([(0.0, found(old)), (10.0, found(old, brief)), (1.0, found())])
        prober = await serve(nursery, scans)
        nursery.start_soon(prober.rescan)
        await trio.testing.wait_all_tasks_blocked()
        report = await prober.rescan()
        assert (paths(report.added), paths(report.removed)) == ([], [old.path])

    async def test_a_cancelled_rescan_is_forgotten(
        self,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
        nursery: trio.Nursery,
    ) -> None:
        """A caller that gives up waiting leaves no request behind: the next scan
        serves only those still waiting."""
        scans = ScriptedScans([(0.0, found()), (10.0, found()), (1.0, found(candidate("a")))])
        prober = await serve(nursery, scans)
        nursery.start_soon(prober.rescan)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1):
            await prober.rescan()
        report = await prober.rescan()
        assert (paths(report.added), len(scans.started)) == ([candidate("a").path], 3)


class TestProbeTiming:
    async def test_every_interval_and_an_overrun_starts_the_next_at_once(
        self,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
        nursery: trio.Nursery,
    ) -> None:
        """Cycles start every interval, time spent probing counting against it;
        a cycle that overruns is followed by the next one at once."""
        scans = ScriptedScans([(0.0, found(candidate("a")))])
        # The first probe (at start-up), the one at 5 s, then one taking 8 s.
        probes = ScriptedProbes([0.5, 0.5, 8.0])
        await serve(nursery, scans, probes, interval=5.0, probe_timeout=10.0)
        await trio.sleep(30 - trio.current_time() - 0.1)
        assert probes.started == [0.0, 5.0, 10.0, 18.0, 23.0, 28.0]


class TestIdle:
    async def test_no_timer_fires_between_probe_cycles(
        self,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
        nursery: trio.Nursery,
        short_tmp: Path,
    ) -> None:
        """At rest (one agent that answers, nothing changing in its watched
        directory), the only timer wake-ups are the probe cycles."""
        agents = short_tmp / "agents"
        agents.mkdir()
        watcher = Watcher.open()
        await nursery.start(watcher.run)
        result = attrs.evolve(found(candidate("a")), watched=((str(agents), ("ssh-", "s.")),))
        scans = ScriptedScans([(0.0, result)], last=result)
        probes = ScriptedProbes(usual=0.0)
        wakeups = WakeUps()
        trio.lowlevel.add_instrument(wakeups)
        try:
            await serve(nursery, scans, probes, interval=5.0, watcher=watcher)
            await trio.sleep(31 - trio.current_time())
        finally:
            trio.lowlevel.remove_instrument(wakeups)
        assert (wakeups.times, probes.started) == (
            [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 31.0],
            [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0],
        )
