"""A leaner socket stream for the relay's hot path.

trio's ``SocketStream`` makes every send and receive a full checkpoint: a
trip through the scheduler even when the kernel could answer at once. A
relayed agent request costs four such operations, and profiling showed that
sandwich, not the system calls, dominating the proxy's own time. This
stream tries the non-blocking system call first and only waits (through
trio's I/O manager, which also checkpoints) when the kernel says it would
block. To stay fair to other tasks, it still yields every few operations
that did not need to wait.
"""

from __future__ import annotations

import select
import socket

import trio

# Operations allowed to complete without passing through the scheduler.
# Low enough that a busy connection cannot starve the others for long; high
# enough that a request and its reply (four operations) usually need none.
_UNYIELDED_BUDGET = 8

# Errors that mean the peer is gone, as trio's SocketStream reports them.
_BROKEN = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class FastSocketStream(trio.abc.HalfCloseableStream):
    """A connected stream socket with immediate-when-possible I/O."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._budget = _UNYIELDED_BUDGET
        self._closed = False
        # The agent protocol is request/response: right after we send on a
        # socket, its peer has not answered yet, so a read attempted at once
        # would only fail with EAGAIN. Wait for readiness first instead.
        self._just_sent = False

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> FastSocketStream:
        """Take over the socket of a trio ``SocketStream`` (which must not be used after)."""
        trio_socket = stream.socket
        # Family and type given explicitly: otherwise socket() asks the kernel.
        return cls(
            socket.socket(
                trio_socket.family, trio_socket.type, trio_socket.proto, trio_socket.detach()
            )
        )

    @property
    def socket(self) -> socket.socket:
        return self._sock

    async def _spend(self) -> None:
        self._budget -= 1
        if self._budget <= 0:
            self._budget = _UNYIELDED_BUDGET
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        size = 65536 if max_bytes is None else max_bytes
        if self._just_sent:
            self._just_sent = False
            await self._wait(trio.lowlevel.wait_readable)
        while True:
            try:
                data = self._sock.recv(size)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_readable)
                continue
            except OSError as exc:
                raise self._stream_error(exc) from exc
            await self._spend()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_writable)
                continue
            except OSError as exc:
                raise self._stream_error(exc) from exc
            view = view[sent:]
        self._just_sent = True
        await self._spend()

    def _stream_error(self, exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
        """The trio error for a failed system call, as trio's SocketStream reports it."""
        if self._closed and not isinstance(exc, _BROKEN):
            return trio.ClosedResourceError("the stream is closed")
        return trio.BrokenResourceError(str(exc))

    async def _wait(self, wait: object) -> None:
        self._budget = _UNYIELDED_BUDGET  # waiting went through the scheduler
        try:
            await wait(self._sock)  # type: ignore[operator]
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the stream was closed while waiting") from None

    def peer_closed(self) -> bool:
        """Whether the peer closed its socket entirely (not just its write side).

        A Unix socket reports POLLHUP only once the peer has shut down both
        directions, so this tells a client that went away from one that
        half-closed and still waits for its reply.
        """
        if self._closed:
            return True
        poller = select.poll()
        poller.register(self._sock, select.POLLHUP)
        return any(events & select.POLLHUP for _, events in poller.poll(0))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.checkpoint()
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()


def peer_closed(stream: trio.abc.Stream) -> bool:
    """Whether ``stream``'s peer is known to have gone; False when we cannot tell."""
    return isinstance(stream, FastSocketStream) and stream.peer_closed()
