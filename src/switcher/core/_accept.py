"""The accept loop both listeners share."""

from __future__ import annotations

import errno
import resource
from collections.abc import Awaitable, Callable
from typing import Literal

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


async def accept_loop(
    listener: trio.abc.Listener[trio.SocketStream],
    handlers: trio.Nursery,
    handle: Callable[[trio.SocketStream], Awaitable[object]],
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
    backoff = _ACCEPT_BACKOFF
    while True:
        if admission is not None:
            await admission.acquire()
        try:
            stream = await listener.accept()
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
        handlers.start_soon(_admitted, handle, stream, admission)


async def _admitted(
    handle: Callable[[trio.SocketStream], Awaitable[object]],
    stream: trio.SocketStream,
    admission: trio.Semaphore | None,
) -> None:
    try:
        await handle(stream)
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
