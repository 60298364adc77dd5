"""The accept loop both listeners share."""

from __future__ import annotations

import errno
import resource
import socket
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, TypeVar, runtime_checkable

import structlog
import trio

from switcher.core._peer import describe_os_error

log = structlog.get_logger()

# When accept() fails for lack of descriptors, pause like sshd does rather
# than spin on an error that will not clear until some connection closes.
_ACCEPT_BACKOFF = 0.1
_ACCEPT_BACKOFF_MAX = 1.0
# The fewest descriptors kept back from relayed connections (see descriptor_budget).
_RESERVED_DESCRIPTORS = 16
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# Each listener logs its accept failures under its own area.
Area = Literal["proxy", "control"]
_ACCEPT_FAILED: dict[Area, str] = {
    "proxy": "switcher.proxy.accept_failed",
    "control": "switcher.control.accept_failed",
}


Accepted = TypeVar("Accepted")
Stream = TypeVar("Stream", bound=trio.abc.AsyncResource)


@runtime_checkable
class SocketListener(Protocol):
    """A listener that hands out accepted sockets as they are, with no stream around them.

    The proxy relays through its own ``RelaySocket``: wrapping each client
    in a trio ``SocketStream`` only to unwrap it again cost a trip through
    the scheduler and eight system calls per connection.
    """

    async def accept_socket(self) -> socket.socket:
        """The next connection; always a checkpoint, like trio's ``accept``."""
        ...

    async def aclose(self) -> None: ...


async def accept_socket(sock: socket.socket) -> socket.socket:
    """Accept one connection on a non-blocking listening socket.

    It waits for readiness first, through trio's I/O manager, and only then
    accepts: so it is always a checkpoint (a loop accepting a flood of
    clients still lets others run) and the usual case, one client at a
    time, costs no accept that fails with EAGAIN. Closing the listener
    (``notify_closing``) wakes it with ``ClosedResourceError``.
    """
    while True:
        if sock.fileno() == -1:
            raise trio.ClosedResourceError("the listener is closed")
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.accept()[0]
        except BlockingIOError:
            continue  # another process took it (a shared listener)


async def accept_loop(
    listener: trio.abc.Listener[Stream],
    handlers: trio.Nursery,
    handle: Callable[[Stream], Awaitable[object]],
    *,
    area: Area,
    admission: trio.Semaphore | None = None,
) -> None:
    """Accept forever, starting ``handle`` for each connection in ``handlers``.

    With ``admission``, a connection is accepted only once a slot is free,
    and its slot is given back when ``handle`` returns; clients beyond that
    wait in the kernel's listen queue rather than being accepted and failed.
    Running out of descriptors pauses accepting (logged under ``area``);
    any other accept error is not ours to handle and ends the loop.
    """
    await _accept_loop(listener.accept, handlers, handle, area=area, admission=admission)


async def accept_socket_loop(
    listener: SocketListener,
    handlers: trio.Nursery,
    handle: Callable[[socket.socket], Awaitable[object]],
    *,
    area: Area,
    admission: trio.Semaphore | None = None,
) -> None:
    """``accept_loop`` for a listener of plain sockets: ``handle`` gets each as it is."""
    await _accept_loop(listener.accept_socket, handlers, handle, area=area, admission=admission)


async def _accept_loop(
    accept: Callable[[], Awaitable[Accepted]],
    handlers: trio.Nursery,
    handle: Callable[[Accepted], Awaitable[object]],
    *,
    area: Area,
    admission: trio.Semaphore | None,
) -> None:
    backoff = _ACCEPT_BACKOFF
    while True:
        if admission is not None:
            # No checkpoint when a slot is free (acquire would make one):
            # accept is one already.
            try:
                admission.acquire_nowait()
            except trio.WouldBlock:
                await admission.acquire()
        try:
            accepted = await accept()
        except OSError as exc:
            if admission is not None:
                admission.release()
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            log.error(_ACCEPT_FAILED[area], reason=describe_os_error(exc), pause_s=backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _ACCEPT_BACKOFF_MAX)
            continue
        except BaseException:
            if admission is not None:
                admission.release()
            raise
        backoff = _ACCEPT_BACKOFF
        handlers.start_soon(_admitted, handle, accepted, admission)


async def _admitted(
    handle: Callable[[Accepted], Awaitable[object]],
    accepted: Accepted,
    admission: trio.Semaphore | None,
) -> None:
    try:
        await handle(accepted)
    finally:
        if admission is not None:
            admission.release()


def descriptor_budget() -> int:
    """How many relayed connections fit in our descriptor limit, two descriptors each.

    An eighth of the limit (at least 16) stays in reserve for everything
    else: listeners, locks, the log, probes, control clients, trio's own.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    reserve = max(_RESERVED_DESCRIPTORS, soft // 8)
    return max(1, (soft - reserve) // 2)
