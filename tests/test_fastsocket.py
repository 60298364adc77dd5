"""FastSocketStream: trio's Stream contract on a raw non-blocking socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from switcher.core._fastsocket import FastSocketStream


@pytest.fixture
def pair() -> Iterator[tuple[FastSocketStream, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = FastSocketStream(ours)
    try:
        yield stream, theirs
    finally:
        ours.close()
        theirs.close()


class TestFastSocketStream:
    async def test_round_trip(self, pair: tuple[FastSocketStream, socket.socket]) -> None:
        """Bytes sent arrive at the peer, and the peer's bytes are received."""
        stream, peer = pair
        with trio.fail_after(5):
            await stream.send_all(b"ping")
            assert peer.recv(10) == b"ping"
            peer.sendall(b"pong")
            assert await stream.receive_some(10) == b"pong"

    async def test_receive_waits_for_data(
        self, pair: tuple[FastSocketStream, socket.socket]
    ) -> None:
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
        self, pair: tuple[FastSocketStream, socket.socket]
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

    async def test_eof_is_empty_bytes(self, pair: tuple[FastSocketStream, socket.socket]) -> None:
        """The peer closing shows as b'' from receive_some."""
        stream, peer = pair
        peer.shutdown(socket.SHUT_WR)
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b""

    async def test_send_to_a_closed_peer_is_broken(
        self, pair: tuple[FastSocketStream, socket.socket]
    ) -> None:
        """Writing after the peer closed raises BrokenResourceError, as trio's streams do."""
        stream, peer = pair
        peer.close()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"anyone there?")

    async def test_use_after_close(self, pair: tuple[FastSocketStream, socket.socket]) -> None:
        """Every operation on a closed stream raises ClosedResourceError; aclose is idempotent."""
        stream, _ = pair
        await stream.aclose()
        await stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some(1)
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_eof()

    async def test_close_wakes_a_blocked_receive(
        self, pair: tuple[FastSocketStream, socket.socket]
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
        self, pair: tuple[FastSocketStream, socket.socket]
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


async def _receive_into(stream: FastSocketStream, out: list[bytes]) -> None:
    out.append(await stream.receive_some(10))
