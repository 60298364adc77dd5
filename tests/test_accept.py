"""The accept loop over plain sockets: each client handed over as it is, and others still run."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from switcher.core import SocketListener, accept_socket, accept_socket_loop

# Hard guard for tests doing real socket I/O (never a performance limit).
HANG_GUARD_S = 10
# More clients than any budget of immediate accepts would let through at once.
QUEUED_CLIENTS = 64


@attrs.define(eq=False)
class _Listener:
    """A SocketListener over one listening Unix socket, as the daemon's is."""

    sock: socket.socket
    # Called after each accept (tests note when it happened).
    on_accept: list[object] = attrs.Factory(list)

    async def accept_socket(self) -> socket.socket:
        sock = await accept_socket(self.sock)
        for note in self.on_accept:
            note()  # type: ignore[operator]
        return sock

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


@pytest.fixture
def listening(short_tmp: Path) -> Iterator[tuple[_Listener, str]]:
    path = str(short_tmp / "l.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(QUEUED_CLIENTS * 2)
    sock.setblocking(False)
    try:
        yield _Listener(sock), path
    finally:
        sock.close()


def _connect_many(path: str, count: int) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        clients.append(client)
    return clients


class TestAcceptSocket:
    def test_the_test_listener_is_a_socket_listener(self, listening: tuple[_Listener, str]) -> None:
        """Anything with accept_socket and aclose is taken as a listener of plain sockets."""
        assert isinstance(listening[0], SocketListener)

    @pytest.mark.parametrize("admission", [True, False], ids=["admission", "no-admission"])
    async def test_a_queue_of_clients_does_not_starve_other_tasks(
        self, listening: tuple[_Listener, str], admission: bool
    ) -> None:
        """Clients already queued are accepted without waiting, yet the loop still
        checkpoints for each one, so another task runs in between."""
        listener, path = listening
        clients = _connect_many(path, QUEUED_CLIENTS)
        accepted: list[socket.socket] = []
        ticks_when_accepted: list[int] = []
        ticks = 0
        all_in = trio.Event()
        listener.on_accept.append(lambda: ticks_when_accepted.append(ticks))

        async def handle(sock: socket.socket) -> None:
            accepted.append(sock)
            if len(accepted) == QUEUED_CLIENTS:
                all_in.set()

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        try:
            with trio.fail_after(HANG_GUARD_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ticker)
                    nursery.start_soon(
                        lambda: accept_socket_loop(
                            listener,
                            nursery,
                            handle,
                            area="proxy",
                            admission=trio.Semaphore(QUEUED_CLIENTS) if admission else None,
                        )
                    )
                    await all_in.wait()
                    nursery.cancel_scope.cancel()
        finally:
            for sock in clients + accepted:
                sock.close()
        # The ticker ran between accepts: at least once per two (trio may run the
        # two tasks of one batch in either order), where without a checkpoint
        # all the queued clients would be taken in one step.
        assert ticks_when_accepted[-1] - ticks_when_accepted[0] >= (QUEUED_CLIENTS - 1) // 2

    async def test_closing_the_listener_ends_a_waiting_accept(
        self, listening: tuple[_Listener, str]
    ) -> None:
        """A task waiting for a client is woken with ClosedResourceError, and so is a
        later call on the closed listener."""
        listener, _ = listening
        ended: list[str] = []

        async def waiting() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await listener.accept_socket()
            ended.append("woken")

        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiting)
                await trio.testing.wait_all_tasks_blocked()
                await listener.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await listener.accept_socket()
        assert ended == ["woken"]
