"""The daemon in-process, on real Unix sockets, with fake agents as backends."""

from __future__ import annotations

import itertools
import os

import pytest
import trio
import trio.testing

from fakes import Behaviour, FakeAgent, make_socket_file
from switcher.core import Health, MessageType, encode
from world import WakeUps, World, answer, chosen, identities

FAILURE = encode(MessageType.FAILURE)


class TestServing:
    async def test_relays_to_a_forwarded_agent(self, world: World) -> None:
        """A client of the stable socket is answered by the agent in /tmp/ssh-*/agent.*."""
        agent = FakeAgent("one")
        with trio.fail_after(10):
            await world.start_agent(agent)
            await world.start_daemon()
            assert await identities(world) == answer(agent)

    async def test_socket_is_private(self, world: World) -> None:
        """The stable socket is created with mode 0600."""
        with trio.fail_after(10):
            handle = await world.start_daemon()
        assert oct(handle.socket_path.stat().st_mode & 0o777) == oct(0o600)

    async def test_new_session_is_noticed_without_a_probe_cycle(self, world: World) -> None:
        """A session that appears later is found by the watcher and preferred (newest wins)."""
        old, new = FakeAgent("old", keys=[b"old"]), FakeAgent("new", keys=[b"new"])
        with trio.fail_after(10):
            old_path, _ = await world.start_agent(old)
            await world.start_daemon()
            await world.wait_until(chosen(old_path))
            new_path, _ = await world.start_agent(new)
            await world.wait_until(chosen(new_path))
            assert await identities(world) == answer(new)

    async def test_closed_session_falls_back_to_the_older(self, world: World) -> None:
        """When the newest session ends, clients are served by the one before it."""
        old, new = FakeAgent("old", keys=[b"old"]), FakeAgent("new", keys=[b"new"])
        with trio.fail_after(10):
            await world.start_agent(old)
            new_path, new_session = await world.start_agent(new)
            await world.start_daemon()
            await world.wait_until(chosen(new_path))
            new_session.cancel()
            await world.wait_until(lambda s: all(b.path != str(new_path) for b in s.backends))
            assert await identities(world) == answer(old)

    async def test_clients_are_served_concurrently(self, world: World) -> None:
        """Twenty clients connected at once are all answered (none waits for another to leave)."""
        agent = FakeAgent("one")
        with trio.fail_after(10):
            await world.start_agent(agent)
            await world.start_daemon()
            clients = [await world.client() for _ in range(20)]
            for client in reversed(clients):
                assert await client.request(MessageType.REQUEST_IDENTITIES) == answer(agent)
            for client in clients:
                await client.stream.aclose()


class TestBadBackends:
    async def test_stale_socket_files_are_dead_and_skipped(self, world: World) -> None:
        """A socket left by a killed sshd (ECONNREFUSED) is ranked dead; the live one serves."""
        agent = FakeAgent("live")
        with trio.fail_after(10):
            live_path, _ = await world.start_agent(agent)
            stale = world.session_dir() / "agent.2"  # newer than the live one
            make_socket_file(str(stale))
            await world.start_daemon()
            snapshot = await world.wait_until(
                lambda s: [b.health for b in s.backends] == [Health.HEALTHY, Health.DEAD]
            )
            assert await identities(world) == answer(agent)
        assert [b.path for b in snapshot.backends] == [str(live_path), str(stale)]
        assert snapshot.backends[1].last_error == "connection refused"

    async def test_only_stale_sockets_means_prompt_failure(self, world: World) -> None:
        """With nothing but dead sockets, a request gets SSH_AGENT_FAILURE at once."""
        make_socket_file(str(world.session_dir() / "agent.1"))
        with trio.fail_after(10):
            await world.start_daemon()
            assert await identities(world) == FAILURE

    async def test_a_backend_that_never_answers_is_slow(self, world: World) -> None:
        """An agent that accepts and never answers is marked slow and ranked below a healthy one."""
        hung, good = FakeAgent("hung", behaviour=Behaviour.HANG), FakeAgent("good")
        with trio.fail_after(10):
            good_path, _ = await world.start_agent(good)
            hung_path, _ = await world.start_agent(hung)  # newer, so it would win if healthy
            await world.start_daemon()
            snapshot = await world.wait_until(
                lambda s: [b.health for b in s.backends] == [Health.HEALTHY, Health.SLOW]
            )
            assert await identities(world) == answer(good)
        assert [b.path for b in snapshot.backends] == [str(good_path), str(hung_path)]

    async def test_a_backend_that_dies_mid_request_fails_over(self, world: World) -> None:
        """A backend that cuts its reply short is replaced by the next, unnoticed by the client."""
        dying, good = FakeAgent("dying", behaviour=Behaviour.DIE_ON_SIGN), FakeAgent("good")
        with trio.fail_after(10):
            await world.start_agent(good)
            dying_path, _ = await world.start_agent(dying)  # newer: chosen first
            await world.start_daemon()
            await world.wait_until(chosen(dying_path))
            client = await world.client()
            async with client.stream:
                reply = await client.request(MessageType.SIGN_REQUEST, b"data")
            snapshot = await world.wait_until(lambda s: s.backends[-1].health is Health.DEAD)
        assert reply == good.answer(MessageType.SIGN_REQUEST)
        assert (snapshot.backends[-1].path, snapshot.backends[-1].last_error) == (
            str(dying_path),
            "closed before answering",
        )


class TestGarbageInTheDirs:
    async def test_garbage_entries_are_ignored(self, world: World) -> None:
        """Files, fifos, symlinks, foreign names and unreadable paths never stop the daemon."""
        agent = FakeAgent("live")
        junk = world.session_dir()
        (junk / "agent.file").write_bytes(b"not a socket")
        os.mkfifo(junk / "agent.fifo")
        (junk / "agent.dir").mkdir()
        (world.agents_dir / "ssh-notadir").write_text("x")
        (world.agents_dir / "ssh-link").symlink_to(junk)
        (world.agents_dir / "s.garbage").write_text("x")
        (world.agents_dir / "unrelated").mkdir()
        not_a_dir = world.root / "plainfile"
        not_a_dir.write_text("x")
        with trio.fail_after(10):
            live, _ = await world.start_agent(agent)
            await world.start_daemon(agents_dirs=(str(world.agents_dir), str(not_a_dir)))
            snapshot = await world.wait_until(chosen(live))
            assert await identities(world) == answer(agent)
        assert [b.path for b in snapshot.backends] == [str(live)]


@pytest.fixture
def real_then_virtual_clock() -> trio.testing.MockClock:
    """A clock that follows real time until the test makes it virtual (rate 0, autojump)."""
    return trio.testing.MockClock(rate=1.0)


class TestIdle:
    async def test_only_the_probe_cycle_wakes_an_idle_daemon(
        self, real_then_virtual_clock: trio.testing.MockClock, world: World
    ) -> None:
        """With one agent and nobody connecting, the whole daemon (prober, watcher,
        socket keeper, relay, control) sleeps between probe cycles: no other timer.

        Start-up runs in real time (scans and watches run in worker threads,
        which virtual time would jump past); at rest, the clock turns virtual
        and jumps only to the next deadline, so the times it jumps to are
        every timer that fired. (Unix sockets within one process deliver at
        once, so the probes do not race the jumps.)"""
        agent = FakeAgent("one")
        with trio.fail_after(60):
            path, _ = await world.start_agent(agent)
            handle = await world.start_daemon(probe_interval=5.0, probe_timeout=2.0)
            await world.wait_until(chosen(path))
        real_then_virtual_clock.rate = 0
        real_then_virtual_clock.autojump_threshold = 0
        started = trio.current_time()
        wakeups = WakeUps(last=started)
        trio.lowlevel.add_instrument(wakeups)
        try:
            await trio.sleep(31)
        finally:
            trio.lowlevel.remove_instrument(wakeups)
        *cycles, end = wakeups.times
        gaps = [round(later - earlier, 6) for earlier, later in itertools.pairwise(cycles)]
        health = [b.health for b in handle.registry.snapshot().backends]
        assert (len(cycles), gaps, end - started, health) == (
            6,
            [5.0] * 5,
            31.0,
            [Health.HEALTHY],
        )
