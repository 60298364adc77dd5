"""RelaySocket: trio's Stream contract on a raw non-blocking socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from switcher.core import RelaySocket
from switcher.core._relaysocket import _UNYIELDED_BUDGET, close_quietly, peer_closed


@pytest.fixture
def pair() -> Iterator[tuple[RelaySocket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = RelaySocket(ours)
    try:
        yield stream, theirs
    finally:
        ours.close()
        theirs.close()


class TestRelaySocket:
    async def test_round_trip(self, pair: tuple[RelaySocket, socket.socket]) -> None:
        """Bytes sent arrive at the peer, and the peer's bytes are received."""
        stream, peer = pair
        with trio.fail_after(5):
            await stream.send_all(b"ping")
            assert peer.recv(10) == b"ping"
            peer.sendall(b"pong")
            assert await stream.receive_some(10) == b"pong"

    async def test_receive_waits_for_data(self, pair: tuple[RelaySocket, socket.socket]) -> None:
        """A receive with nothing available blocks until the peer writes."""
        stream, peer = pair
        received: list[bytes] = []
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _receive_into(stream, received))
                await trio.testing.wait_all_tasks_blocked()
                assert received == []
                peer.sendall(b"late")
        assert received == [b"late"]

    async def test_large_send_completes_despite_a_full_buffer(
        self, pair: tuple[RelaySocket, socket.socket]
    ) -> None:
        """A send larger than the socket buffer finishes once the peer drains it."""
        stream, peer = pair
        payload = b"x" * (4 * 1024 * 1024)
        got = bytearray()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                while len(got) < len(payload):
                    await trio.lowlevel.wait_readable(peer)
                    got += peer.recv(1 << 20)
        assert bytes(got) == payload

    async def test_eof_is_empty_bytes(self, pair: tuple[RelaySocket, socket.socket]) -> None:
        """The peer closing shows as b'' from receive_some."""
        stream, peer = pair
        peer.shutdown(socket.SHUT_WR)
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b""

    async def test_send_to_a_closed_peer_is_broken(
        self, pair: tuple[RelaySocket, socket.socket]
    ) -> None:
        """Writing after the peer closed raises BrokenResourceError, as trio's streams do."""
        stream, peer = pair
        peer.close()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"anyone there?")

    async def test_use_after_close(self, pair: tuple[RelaySocket, socket.socket]) -> None:
        """Every operation on a closed stream raises ClosedResourceError; aclose is idempotent."""
        stream, _ = pair
        await stream.aclose()
        await stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some(1)
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"x")

    async def test_close_wakes_a_blocked_receive(
        self, pair: tuple[RelaySocket, socket.socket]
    ) -> None:
        """Closing the stream while a task waits to receive wakes it with ClosedResourceError."""
        stream, _ = pair
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def blocked() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await stream.receive_some(10)

                nursery.start_soon(blocked)
                await trio.testing.wait_all_tasks_blocked()
                await stream.aclose()

    async def test_a_busy_stream_still_lets_others_run(
        self, pair: tuple[RelaySocket, socket.socket]
    ) -> None:
        """Operations that never block still yield now and then, so other tasks are not starved."""
        stream, peer = pair
        peer.sendall(b"y" * 100_000)  # always something to read
        ticks = 0

        async def other() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)
                for _ in range(100):
                    await stream.receive_some(1)
                nursery.cancel_scope.cancel()
        assert ticks >= 100 // 8 - 1


class TestContract:
    async def test_an_operation_that_waits_is_cancellable(
        self, pair: tuple[RelaySocket, socket.socket]
    ) -> None:
        """A receive with nothing to read waits through trio, so cancelling it works."""
        stream, _ = pair
        with trio.fail_after(5):
            with trio.move_on_after(0) as scope:
                await stream.receive_some(10)
        assert scope.cancelled_caught

    async def test_cancellation_is_noticed_within_the_budget(
        self, pair: tuple[RelaySocket, socket.socket]
    ) -> None:
        """A cancelled task whose operations never need to wait still sees the cancellation
        within ``_UNYIELDED_BUDGET`` operations."""
        stream, peer = pair
        peer.sendall(b"z" * 1000)  # always something to read
        completed = 0
        with trio.fail_after(5):
            with trio.CancelScope() as scope:
                scope.cancel()
                while completed < 100:
                    await stream.receive_some(1)
                    completed += 1
        assert completed < _UNYIELDED_BUDGET

    async def test_immediate_operations_do_not_yield_every_time(
        self, pair: tuple[RelaySocket, socket.socket]
    ) -> None:
        """What makes it fast: a request and its reply that need no waiting cost no trip
        through the scheduler (so it is not a trio Stream, whose operations always do)."""
        stream, peer = pair
        peer.sendall(b"r" * 10)
        steps = _TaskSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            with trio.fail_after(5):
                steps.watch(trio.lowlevel.current_task())
                await stream.receive_some(5)
                await stream.receive_some(5)
                steps.stop()
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert steps.count == 0

    async def test_aclose_is_a_checkpoint_and_works_as_a_context_manager(
        self, pair: tuple[RelaySocket, socket.socket]
    ) -> None:
        """Closing honours a pending cancellation after closing, and ``async with`` closes."""
        stream, _ = pair
        with trio.CancelScope() as scope:
            scope.cancel()
            async with stream:
                pass
        assert scope.cancelled_caught
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some(1)

    async def test_close_quietly_closes_at_once_or_shielded(
        self, pair: tuple[RelaySocket, socket.socket]
    ) -> None:
        """A RelaySocket closes without going back to the scheduler (so without a
        cancellation point), waking a task blocked on it; any other stream is closed
        even inside a cancelled scope."""
        stream, _ = pair
        memory, _ = trio.testing.memory_stream_pair()
        steps = _TaskSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:

                    async def blocked() -> None:
                        with pytest.raises(trio.ClosedResourceError):
                            await stream.receive_some(10)

                    nursery.start_soon(blocked)
                    await trio.testing.wait_all_tasks_blocked()
                    steps.watch(trio.lowlevel.current_task())
                    with trio.CancelScope() as scope:
                        scope.cancel()
                        await close_quietly(stream)
                        await close_quietly(stream)  # idempotent
                        closed_steps = steps.count
                        await close_quietly(memory)
                    steps.stop()
        finally:
            trio.lowlevel.remove_instrument(steps)
        with pytest.raises(trio.ClosedResourceError):
            await memory.send_all(b"x")
        assert (closed_steps, scope.cancelled_caught) == (0, False)

    async def test_peer_closed_tells_a_hang_up_from_a_half_close(
        self, pair: tuple[RelaySocket, socket.socket]
    ) -> None:
        """A peer that shut only its write side still wants a reply; one that closed does not."""
        stream, peer = pair
        assert not peer_closed(stream)
        peer.shutdown(socket.SHUT_WR)
        assert not peer_closed(stream)
        peer.close()
        assert peer_closed(stream)

    def test_other_streams_are_never_judged_gone(self) -> None:
        """For a stream that is not a RelaySocket (a memory stream), we cannot tell."""
        ours, _ = trio.testing.memory_stream_pair()
        assert not peer_closed(ours)


class _TaskSteps(trio.abc.Instrument):
    """Counts how often one task goes back to the scheduler and is run again."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.count = 0

    def watch(self, task: trio.lowlevel.Task) -> None:
        self.task = task

    def stop(self) -> None:
        self.task = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count += 1


async def _receive_into(stream: RelaySocket, out: list[bytes]) -> None:
    out.append(await stream.receive_some(10))
