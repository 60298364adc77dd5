"""Agent loops: a forwarded socket that leads back into switcher is found, never used,
and never makes a request wait on itself."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from fakes import SESSION_BIND, AgentClient, FakeAgent, LoopAgent, MemoryBackends
from switcher.core import (
    Candidate,
    Health,
    Layout,
    LoopGuard,
    MessageType,
    ProbeResult,
    Registry,
    Snapshot,
    encode,
    relay_connection,
)
from switcher.core._loops import LOOP_CHECK_NAME
from world import World, answer, chosen, identities

FAILURE = encode(MessageType.FAILURE)

# The world's 0.2 s probe timeout is for tests of slow agents. A loop check
# here crosses the daemon twice in this very process, and on a loaded machine
# that can take longer: a probe that times out in its check leaves the loop
# unchecked (slow) until the next cycle, an hour away in the world.
CHECK_PATIENCE_S = 10.0


def looped(path: Path) -> Callable[[Snapshot], bool]:
    def check(snapshot: Snapshot) -> bool:
        return any(b.path == str(path) and b.health is Health.LOOP for b in snapshot.backends)

    return check


async def start_loop(world: World) -> tuple[LoopAgent, Path, trio.CancelScope]:
    assert world.daemon is not None
    loop = LoopAgent(str(world.daemon.socket_path))
    path, session = await world.start_agent(loop)
    return loop, path, session


class TestLoopFound:
    async def test_a_new_loop_is_marked_and_never_chosen(self, world: World) -> None:
        """A session that leads back into switcher is marked ``loop`` with its reason,
        the real agent stays chosen, and every request is answered by it."""
        real = FakeAgent("real")
        with trio.fail_after(20):
            real_path, _ = await world.start_agent(real)
            await world.start_daemon(probe_timeout=CHECK_PATIENCE_S)
            await world.wait_until(chosen(real_path))
            _, loop_path, _ = await start_loop(world)
            snapshot = await world.wait_until(looped(loop_path))
            for _ in range(12):
                assert await identities(world) == answer(real)
        (found,) = [b for b in snapshot.backends if b.path == str(loop_path)]
        assert (snapshot.choice and snapshot.choice.path, found.last_error) == (
            str(real_path),
            "leads back to switcher",
        )

    async def test_requests_never_hang_on_an_unprobed_loop(self, world: World) -> None:
        """With only a loop there (not yet probed when the requests come), every request
        is answered, FAILURE at worst: none waits on its own chain."""
        with trio.fail_after(20):
            await world.start_daemon(probe_timeout=CHECK_PATIENCE_S)
            _, loop_path, _ = await start_loop(world)
            replies = [await identities(world) for _ in range(12)]
            await world.wait_until(looped(loop_path))
            assert await identities(world) == FAILURE
        assert set(replies) == {FAILURE}

    async def test_the_outer_session_ending_leaves_no_hang(self, world: World) -> None:
        """When the real session ends and only the loop is left, requests fail at once."""
        real = FakeAgent("real")
        with trio.fail_after(20):
            real_path, real_session = await world.start_agent(real)
            await world.start_daemon(probe_timeout=CHECK_PATIENCE_S)
            await world.wait_until(chosen(real_path))
            _, loop_path, _ = await start_loop(world)
            await world.wait_until(looped(loop_path))
            real_session.cancel()
            await world.wait_until(lambda s: all(b.path != str(real_path) for b in s.backends))
            for _ in range(5):
                assert await identities(world) == FAILURE


class TestLoopGone:
    async def test_a_loop_that_goes_is_usable_again_and_logged_once_each_way(
        self, world: World
    ) -> None:
        """Each probe cycle checks again: once the socket no longer leads back, it is
        healthy and chosen (it is the newest); the log says so once each way."""
        real = FakeAgent("real")
        with structlog.testing.capture_logs() as logs, trio.fail_after(20):
            real_path, _ = await world.start_agent(real)
            daemon = await world.start_daemon(probe_timeout=CHECK_PATIENCE_S)
            await world.wait_until(chosen(real_path))
            loop, loop_path, _ = await start_loop(world)
            await world.wait_until(looped(loop_path))
            await daemon.prober.refresh()  # still a loop: no new event
            loop.looping = False
            await daemon.prober.refresh()
            await world.wait_until(chosen(loop_path))
            assert await identities(world) == answer(loop.plain)
        changes = [
            (e["previous"], e["health"])
            for e in logs
            if e["event"] == "switcher.registry.health_changed" and e["path"] == str(loop_path)
        ]
        assert [c for c in changes if "loop" in c] == [("unknown", "loop"), ("loop", "healthy")]


def check_frame(nonce: bytes, name: bytes = LOOP_CHECK_NAME) -> bytes:
    return encode(
        MessageType.EXTENSION,
        struct.pack(">I", len(name)) + name + struct.pack(">I", len(nonce)) + nonce,
    )


class _Capture:
    """A stream that keeps what the guard sends and answers with ``reply``."""

    def __init__(self, reply: bytes) -> None:
        self.sent = b""
        self.reply = reply

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += bytes(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:  # noqa: ARG002
        reply, self.reply = self.reply, b""
        return reply

    async def aclose(self) -> None:
        pass


class TestRelayAnswersItsOwnChecks:
    async def test_our_check_is_answered_in_order_and_never_relayed(self) -> None:
        """A check of ours arriving between other requests gets FAILURE in its place;
        the agent sees only the others. Another switcher's check (another token) and
        other extensions are relayed as they are."""
        agent = FakeAgent("agent")
        guard = LoopGuard()
        ours_sent = _Capture(encode(MessageType.FAILURE))
        # The guard's own check, captured on its way out: its nonce carries our token.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guard.check, ours_sent, "/a/elsewhere")
            await trio.testing.wait_all_tasks_blocked()
        foreign = check_frame(b"\x00" * 24)
        registry = Registry()
        registry.reconcile([Candidate("/a/agent", Layout.TMP, 1, 1, 1.0)])
        registry.record_probe(
            registry.snapshot().backends[0].id, ProbeResult(Health.HEALTHY, loop_clear=True)
        )
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                backends = MemoryBackends(nursery, {"/a/agent": agent})
                ours, theirs = trio.testing.memory_stream_pair()

                async def rescan() -> None:
                    pass

                nursery.start_soon(
                    functools.partial(
                        relay_connection,
                        theirs,
                        registry=registry,
                        connect=backends.connect,
                        rescan=rescan,
                        loops=guard,
                    )
                )
                client = AgentClient(ours)
                identities_request = encode(MessageType.REQUEST_IDENTITIES)
                await ours.send_all(identities_request + ours_sent.sent + foreign)
                replies = [await client.read_frame() for _ in range(3)]
                await ours.aclose()
        assert replies == [answer(agent), FAILURE, agent.answer(MessageType.EXTENSION)]
        assert agent.raw_requests == [identities_request, foreign]

    async def test_a_check_that_does_not_come_back_is_no_loop(self) -> None:
        """An agent that answers the check itself (FAILURE, as ssh-agent does) is no loop;
        one that hangs up on it raises, so the caller can ask again without it."""
        guard = LoopGuard()
        assert await guard.check(_Capture(encode(MessageType.FAILURE)), "/a/real") is False
        with pytest.raises(trio.BrokenResourceError):
            await guard.check(_Capture(b""), "/a/rude")
        assert not guard.checking("/a/real")


class TestUnprobedAgents:
    async def _relay_one(
        self, agent: FakeAgent, request: bytes, probed: ProbeResult | None = None
    ) -> bytes:
        """Relay one request to ``agent``, registered and never probed (or probed with
        the result ``probed``), with a guard."""
        registry = Registry()
        registry.reconcile([Candidate("/a/new", Layout.TMP, 1, 1, 1.0)])
        if probed is not None:
            registry.record_probe(registry.snapshot().backends[0].id, probed)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                backends = MemoryBackends(nursery, {"/a/new": agent})
                ours, theirs = trio.testing.memory_stream_pair()

                async def rescan() -> None:
                    pass

                nursery.start_soon(
                    functools.partial(
                        relay_connection,
                        theirs,
                        registry=registry,
                        connect=backends.connect,
                        rescan=rescan,
                        loops=LoopGuard(),
                    )
                )
                await ours.send_all(request)
                reply = await AgentClient(ours).read_frame()
                await ours.aclose()
        return reply

    async def test_a_session_bind_never_goes_to_an_unprobed_agent(self) -> None:
        """session-bind, which the inner ssh waits on before serving any channel, is
        answered FAILURE rather than sent to an agent that might be that ssh's own socket."""
        agent = FakeAgent("new")
        assert await self._relay_one(agent, SESSION_BIND) == FAILURE
        assert agent.connections == 0

    async def test_other_requests_check_an_unprobed_agent_first(self) -> None:
        """Any other request goes to an unprobed agent once a loop check on the same
        connection came back from the agent itself."""
        agent = FakeAgent("new")
        reply = await self._relay_one(agent, encode(MessageType.REQUEST_IDENTITIES))
        assert (reply, agent.requests) == (
            answer(agent),
            [MessageType.EXTENSION, MessageType.REQUEST_IDENTITIES],
        )

    async def test_a_probe_that_timed_out_in_its_check_leaves_the_agent_unchecked(
        self,
    ) -> None:
        """An agent whose probe ran out of time before its loop check answered is slow,
        not cleared: the relay checks it before relaying into it, and a session-bind
        never goes to it."""
        timed_out = ProbeResult(Health.SLOW, error="no answer within 2 s")
        agent = FakeAgent("slow")
        reply = await self._relay_one(agent, encode(MessageType.REQUEST_IDENTITIES), timed_out)
        assert (reply, agent.requests) == (
            answer(agent),
            [MessageType.EXTENSION, MessageType.REQUEST_IDENTITIES],
        )
        bound = FakeAgent("slow")
        assert await self._relay_one(bound, SESSION_BIND, timed_out) == FAILURE
        assert bound.connections == 0
