"""Our sockets stay ours: a listener whose socket can be swapped, and the task that puts a
deleted socket back (``rm``, systemd-tmpfiles cleaning ``/tmp``).

Connections already accepted are never disturbed; a path another switcher
has taken in the meantime is left to it, and the daemon stops.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import attrs
import structlog
import trio

from switcher.core import Interest, Watcher, accept_socket
from switcher.instancelock import AlreadyRunningError
from switcher.pathsafety import UnsafePathError
from switcher.served import LISTEN_BACKLOG, ServedSocket

log = structlog.get_logger()


@attrs.define(eq=False)
class SwappableListener(trio.abc.Listener[trio.SocketStream]):
    """A listener whose socket can be replaced while a task waits in ``accept``.

    The services accept from it as from any listener (the proxy takes plain
    sockets, with ``accept_socket``). ``swap`` closes the old socket, which
    wakes the waiting accept, and that carries on with the new one.
    Connections already accepted are sockets of their own: they never
    notice.
    """

    _sock: socket.socket
    _current: trio.SocketListener = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._current = listener_for(self._sock)  # makes the socket non-blocking

    async def accept(self) -> trio.SocketStream:
        while True:
            listener = self._current
            try:
                return await listener.accept()
            except trio.ClosedResourceError:
                if listener is self._current:
                    raise  # closed for good, not swapped

    async def accept_socket(self) -> socket.socket:
        while True:
            sock = self._sock
            try:
                return await accept_socket(sock)
            except trio.ClosedResourceError:
                if sock is self._sock:
                    raise  # closed for good, not swapped

    async def swap(self, new: socket.socket) -> None:
        old, self._current, self._sock = self._current, listener_for(new), new
        await old.aclose()

    async def aclose(self) -> None:
        await self._current.aclose()


def listener_for(sock: socket.socket) -> trio.SocketListener:
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


@attrs.define(eq=False)
class _Bell:
    """Rung from synchronous code, awaited by one task; rings while nobody waits add up to one."""

    _rung: trio.Event = attrs.Factory(trio.Event)

    def ring(self) -> None:
        self._rung.set()

    async def wait(self) -> None:
        await self._rung.wait()
        self._rung = trio.Event()


async def keep_sockets(
    sockets: list[tuple[ServedSocket, SwappableListener]],
    *,
    watcher: Watcher,
    rebound: Callable[[], None],
    stop: Callable[..., None],
) -> None:
    """Put back a socket of ours that has vanished from its path.

    The watcher says when an entry named like one of our sockets leaves its
    directory (or the directory goes); where it cannot watch, the probe
    cycle asks instead, once per probe interval. No timer of our own. Each
    loss is logged once. If another switcher has taken the path in the
    meantime, it serves our clients now and we stop. Activated sockets are
    systemd's to look after.
    """
    kept = [(served, listener) for served, listener in sockets if not served.is_activated]
    if not kept:
        return
    bell = _Bell()
    watcher.follow(
        "sockets",
        [Interest(str(served.path.parent), (served.path.name,)) for served, _ in kept],
        bell.ring,
    )
    reported: dict[Path, str] = {}
    while True:
        await bell.wait()
        for served, listener in kept:
            # File-system calls, like every other, in a worker thread.
            if await trio.to_thread.run_sync(served.in_place):
                continue
            try:
                sock = await trio.to_thread.run_sync(served.rebind, LISTEN_BACKLOG)
            except AlreadyRunningError as exc:
                log.error("switcher.daemon.socket_lost", path=str(served.path), reason=str(exc))
                stop(reason="socket_lost")
                return
            except (UnsafePathError, OSError) as exc:
                # Tried again at the next change or probe cycle; said again
                # only if the reason changes. A plain OSError (out of
                # descriptors, a removal racing ours) is as passing as an
                # unsafe path: neither stops the daemon.
                reason = describe(exc)
                if reported.get(served.path) != reason:
                    reported[served.path] = reason
                    log.error(
                        "switcher.daemon.socket_recreate_failed",
                        path=str(served.path),
                        reason=reason,
                    )
                continue
            reported.pop(served.path, None)
            await listener.swap(sock)
            rebound()
            log.warning("switcher.daemon.socket_recreated", path=str(served.path))


def describe(exc: Exception) -> str:
    """The reason to log for a failure: the OS's words for an OSError, else the message."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
