"""The relay asks session affinity which agent to try first, and only when it could matter."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from fakes import AgentClient, FakeAgent, MemoryBackends
from switcher.core import ChosenBy, Decision, Health, Registry, Snapshot, relay_connection
from test_proxy import Harness, answer_of, identities


@pytest.fixture
async def relay() -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        yield Harness(nursery, Registry(), MemoryBackends(nursery))
        nursery.cancel_scope.cancel()


class Chooser:
    """Session affinity stand-in: prefers the agent at ``path`` and counts its calls."""

    def __init__(self, path: str | None, chosen_by: ChosenBy = ChosenBy.SESSION) -> None:
        self.path = path
        self.chosen_by = chosen_by
        self.calls = 0

    async def __call__(self, snapshot: Snapshot) -> Decision:
        self.calls += 1
        backend = next((b for b in snapshot.backends if b.path == self.path), None)
        if backend is None:
            return Decision(ChosenBy.RANK)
        return Decision(self.chosen_by, backend, tmux_client="/dev/pts/9", sshd_pid=4321)


def open_client(relay: Harness, choose: Chooser) -> AgentClient:
    ours, theirs = trio.testing.memory_stream_pair()

    async def serve() -> None:
        result = await relay_connection(
            theirs,
            registry=relay.registry,
            connect=relay.backends.connect,
            rescan=relay.rescan,
            choose=choose,
        )
        relay.outcomes.append(result.outcome.value)

    relay.nursery.start_soon(serve)
    return AgentClient(ours)


def closed_events(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == "switcher.proxy.connection_closed"]


class TestAffinityInTheRelay:
    async def test_the_preferred_agent_answers_though_another_ranks_first(
        self, relay: Harness
    ) -> None:
        """With two usable agents, the older session's client is served by the older agent."""
        old, new = FakeAgent("old", keys=[b"old-key"]), FakeAgent("new", keys=[b"new-key"])
        relay.add(old, "/a/old", 100, health=Health.HEALTHY)
        relay.add(new, "/a/new", 200, health=Health.HEALTHY)
        choose = Chooser("/a/old", ChosenBy.TMUX_CLIENT)
        with structlog.testing.capture_logs() as logs, trio.fail_after(5):
            client = open_client(relay, choose)
            assert await identities(client) == answer_of(old)
            await client.stream.aclose()
            await relay.wait_outcomes(1)
        assert (new.connections, choose.calls) == (0, 1)
        (closed,) = closed_events(logs)
        assert {k: closed[k] for k in ("chosen_by", "tmux_client", "session_sshd_pid")} == {
            "chosen_by": "tmux_client",
            "tmux_client": "/dev/pts/9",
            "session_sshd_pid": 4321,
        }

    async def test_one_usable_agent_asks_nobody(self, relay: Harness) -> None:
        """With one usable agent the chooser is never called and the log says rank."""
        only, dead = FakeAgent("only"), FakeAgent("dead")
        relay.add(only, "/a/only", 100, health=Health.HEALTHY)
        relay.add(dead, "/a/dead", 200, health=Health.DEAD)
        choose = Chooser("/a/dead")
        with structlog.testing.capture_logs() as logs, trio.fail_after(5):
            client = open_client(relay, choose)
            assert await identities(client) == answer_of(only)
            await client.stream.aclose()
            await relay.wait_outcomes(1)
        assert choose.calls == 0
        assert closed_events(logs)[0]["chosen_by"] == "rank"

    async def test_a_preferred_agent_that_fails_falls_over_to_the_ranking(
        self, relay: Harness
    ) -> None:
        """A session's agent that refuses (its sshd just exited) costs the client nothing."""
        new = FakeAgent("new", keys=[b"new-key"])
        relay.add(None, "/a/gone", 100, health=Health.HEALTHY)  # refuses connections
        relay.add(new, "/a/new", 200, health=Health.HEALTHY)
        with trio.fail_after(5):
            client = open_client(relay, Chooser("/a/gone"))
            assert await identities(client) == answer_of(new)
            await client.stream.aclose()
            assert await relay.wait_outcomes(1) == ["ok"]

    async def test_the_decision_is_made_once_per_connection(self, relay: Harness) -> None:
        """Requests after the first stay on the connection's agent without asking again."""
        old, new = FakeAgent("old"), FakeAgent("new")
        relay.add(old, "/a/old", 100, health=Health.HEALTHY)
        relay.add(new, "/a/new", 200, health=Health.HEALTHY)
        choose = Chooser("/a/old")
        with trio.fail_after(5):
            client = open_client(relay, choose)
            for _ in range(3):
                assert await identities(client) == answer_of(old)
        assert choose.calls == 1

    async def test_a_connection_that_asks_nothing_has_no_choice(self, relay: Harness) -> None:
        relay.add(FakeAgent("a"), "/a/a", 100, health=Health.HEALTHY)
        with structlog.testing.capture_logs() as logs, trio.fail_after(5):
            client = open_client(relay, Chooser(None))
            await client.stream.aclose()
            await relay.wait_outcomes(1)
        assert closed_events(logs)[0]["chosen_by"] is None
