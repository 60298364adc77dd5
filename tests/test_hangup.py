"""The hang-up watch: it runs only while a reply is owed, and cuts clients that left."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing

from fakes import AgentClient, Behaviour, FakeAgent, MemoryBackends
from switcher.core import (
    Candidate,
    HangupWatch,
    Health,
    Layout,
    MessageType,
    ProbeResult,
    Registry,
    relay_connection,
)

_WATCH_TASK = "hangup-watch"


class _Wakeups(trio.abc.Instrument):
    """Counts the steps of the watch's task: each is one wake-up."""

    def __init__(self) -> None:
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == _WATCH_TASK:
            self.count += 1


@attrs.define(eq=False)
class Relay:
    """A proxy's relay and hang-up watch over memory streams, with one fake agent."""

    nursery: trio.Nursery
    agent: FakeAgent
    watch: HangupWatch
    wakeups: _Wakeups
    registry: Registry = attrs.Factory(Registry)

    def open_client(self) -> AgentClient:
        backends = MemoryBackends(self.nursery, {"/a/agent": self.agent})
        ours, theirs = trio.testing.memory_stream_pair()

        async def rescan() -> None:
            pass

        self.nursery.start_soon(
            lambda: relay_connection(
                theirs,
                registry=self.registry,
                connect=backends.connect,
                rescan=rescan,
                watch=self.watch,
            )
        )
        return AgentClient(ours)


@pytest.fixture
async def relay(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Relay]:
    behaviour = getattr(request, "param", Behaviour.NORMAL)
    wakeups = _Wakeups()
    trio.lowlevel.add_instrument(wakeups)
    try:
        async with trio.open_nursery() as nursery:
            relay = Relay(nursery, FakeAgent("agent", behaviour=behaviour), HangupWatch(), wakeups)
            relay.registry.reconcile([Candidate("/a/agent", Layout.TMP, 1, 1, 100.0)])
            backend = relay.registry.snapshot().backends[0]
            relay.registry.record_probe(backend.id, ProbeResult(Health.HEALTHY))
            nursery.start_soon(relay.watch.run, name=_WATCH_TASK)
            await trio.testing.wait_all_tasks_blocked()
            yield relay
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(wakeups)


class TestIdle:
    async def test_no_wakeups_without_connections(
        self,
        relay: Relay,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
    ) -> None:
        """A daemon nobody talks to: an hour passes and the watch never wakes."""
        relay.wakeups.count = 0
        await trio.sleep(3600)
        assert relay.wakeups.count == 0

    async def test_no_wakeups_while_a_connection_sits_idle(
        self,
        relay: Relay,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
    ) -> None:
        """A client that got its answers and keeps its connection open owes nothing:
        after at most one last check, an hour passes without a wake-up."""
        with trio.fail_after(60):
            client = relay.open_client()
            await client.request(MessageType.REQUEST_IDENTITIES)
        await trio.sleep(5)  # the last check, if one was armed
        relay.wakeups.count = 0
        await trio.sleep(3600)
        assert (relay.watch.waiting, relay.wakeups.count) == (0, 0)


class TestWaiting:
    @pytest.mark.parametrize("relay", [Behaviour.HANG], indirect=True)
    async def test_checks_once_a_second_while_a_reply_is_owed(
        self,
        relay: Relay,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
    ) -> None:
        """While the agent thinks, the watch looks once a second, no more."""
        client = relay.open_client()
        await client.stream.send_all(b"\x00\x00\x00\x01\x0b")
        while not relay.agent.requests:
            await relay.agent.request_seen.wait()
        relay.wakeups.count = 0
        await trio.sleep(10.5)  # ten checks, not one near the end of the sleep
        assert (relay.watch.waiting, relay.wakeups.count) == (1, 10)


@attrs.define(eq=False)
class _FakeWaiter:
    hung_up: bool
    cuts: int = 0

    def client_hung_up(self) -> bool:
        return self.hung_up

    def cut(self) -> None:
        self.cuts += 1


class TestCutting:
    async def test_cuts_only_clients_that_hung_up_after_waiting_a_while(
        self,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
    ) -> None:
        """A waiter whose client closed is cut once it has waited a second; a waiter
        whose client is still there, or that only just started, is left alone."""
        watch = HangupWatch()
        stayed, left, fresh = _FakeWaiter(False), _FakeWaiter(True), _FakeWaiter(True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            watch.start_waiting(stayed)
            watch.start_waiting(left)
            await trio.sleep(0.5)
            watch.start_waiting(fresh)
            await trio.sleep(0.6)  # the first check: fresh has waited 0.6 s
            assert (stayed.cuts, left.cuts, fresh.cuts) == (0, 1, 0)
            nursery.cancel_scope.cancel()
