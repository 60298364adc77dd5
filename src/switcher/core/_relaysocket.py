"""The relay's socket: immediate when the kernel can answer, bounded when not.

trio's ``SocketStream`` makes every send and receive a full checkpoint: a
trip through the scheduler even when the kernel could answer at once. A
relayed agent request costs four such operations, and profiling showed that
sandwich, not the system calls, dominating the proxy's own time.
``RelaySocket`` is therefore not a ``trio.abc.Stream`` (whose contract makes
every operation a checkpoint) but a type of its own, with this contract:

- ``send_all`` and ``receive_some`` first try the system call. When the
  kernel would block, they wait through trio's I/O manager: a full
  checkpoint (cancellation is delivered there, other tasks run).
- An operation that did not need to wait is a checkpoint only once every
  ``_UNYIELDED_BUDGET`` operations. So a task that keeps finding data ready
  still lets others run, and a cancelled task notices within that many
  operations: fairness and cancellation latency stay bounded.
- ``receive_some`` right after a ``send_all`` waits for readability first
  (the peer of an agent socket has not answered yet; trying at once would
  only fail with EAGAIN).
- ``aclose`` is idempotent and a checkpoint; ``close`` is the same without
  the checkpoint (the relay's last step, which must not be interrupted
  anyway); a task blocked in an operation
  on the socket is woken with ``ClosedResourceError``; operations on a
  closed socket raise ``ClosedResourceError``, and a peer that went away
  shows as ``BrokenResourceError``, as with trio's streams.

The relay is written against :class:`RelayStream`, which both this type and
trio's streams (memory streams in tests, ``SocketStream`` in the benchmark)
satisfy.
"""

from __future__ import annotations

import select
import socket
from typing import Protocol

import trio

# Operations allowed to complete without passing through the scheduler.
# Low enough that a busy connection cannot starve the others (or ignore a
# cancellation) for long; high enough that a request and its reply (four
# operations) usually need none.
_UNYIELDED_BUDGET = 8

# Errors that mean the peer is gone, as trio's SocketStream reports them.
_BROKEN = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class RelayStream(Protocol):
    """What the relay needs of a byte stream: a ``RelaySocket`` or any trio stream."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...

    async def aclose(self) -> None: ...


class RelaySocket(trio.abc.AsyncResource):
    """A connected stream socket with immediate-when-possible I/O (see the module)."""

    def __init__(self, sock: socket.socket) -> None:
        if sock.gettimeout() != 0.0:  # not made non-blocking already (SOCK_NONBLOCK)
            sock.setblocking(False)
        self._sock = sock
        self._budget = _UNYIELDED_BUDGET
        self._closed = False
        self._just_sent = False

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> RelaySocket:
        """Take over the socket of a trio ``SocketStream`` (which must not be used after)."""
        return cls(detach(stream))

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
            raise trio.ClosedResourceError("the socket is closed")
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
            raise trio.ClosedResourceError("the socket is closed")
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
            return trio.ClosedResourceError("the socket is closed")
        return trio.BrokenResourceError(str(exc))

    async def _wait(self, wait: object) -> None:
        self._budget = _UNYIELDED_BUDGET  # waiting went through the scheduler
        try:
            await wait(self._sock)  # type: ignore[operator]
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the socket was closed while waiting") from None

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

    def close(self) -> None:
        """``aclose`` without its checkpoint, for the relay's own last step."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


def detach(stream: trio.SocketStream) -> socket.socket:
    """The socket of a trio ``SocketStream``, taken over (the stream must not be used after)."""
    trio_socket = stream.socket
    # Family and type given explicitly: otherwise socket() asks the kernel.
    return socket.socket(
        trio_socket.family, trio_socket.type, trio_socket.proto, trio_socket.detach()
    )


async def close_quietly(stream: RelayStream) -> None:
    """Close a stream at the end of a connection, never interrupted by a cancellation.

    A ``RelaySocket`` closes at once, without a checkpoint: the two closes
    that end each connection had cost two trips through the scheduler and
    two cancel scopes. Other streams get a shielded ``aclose``.
    """
    if isinstance(stream, RelaySocket):
        stream.close()
        return
    with trio.CancelScope(shield=True):
        await stream.aclose()


def peer_closed(stream: RelayStream) -> bool:
    """Whether ``stream``'s peer is known to have gone; False when we cannot tell."""
    return isinstance(stream, RelaySocket) and stream.peer_closed()
