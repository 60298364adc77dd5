"""The accept loop both listeners share."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import structlog
import trio

from switcher.core._peer import describe_os_error

log = structlog.get_logger()

# When accept() fails for lack of descriptors, pause like sshd does rather
# than spin on an error that will not clear until some connection closes.
_ACCEPT_BACKOFF = 0.1
_ACCEPT_BACKOFF_MAX = 1.0
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def accept_loop(
    listener: trio.abc.Listener[trio.SocketStream],
    handlers: trio.Nursery,
    handle: Callable[[trio.SocketStream], Awaitable[object]],
) -> None:
    """Accept forever, starting ``handle`` for each connection in ``handlers``."""
    backoff = _ACCEPT_BACKOFF
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            log.error("switcher.accept_failed", reason=describe_os_error(exc), pause_s=backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _ACCEPT_BACKOFF_MAX)
            continue
        backoff = _ACCEPT_BACKOFF
        handlers.start_soon(handle, stream)
