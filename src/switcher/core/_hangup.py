"""The hang-up watch: end connections whose client left while an agent was thinking."""

from __future__ import annotations

from typing import Protocol

import attrs
import trio

# While a reply is owed, how often to check that the client is still there.
_CLIENT_CHECK_INTERVAL = 1.0


class Waiter(Protocol):
    """A connection waiting for its agent's reply."""

    def client_hung_up(self) -> bool:
        """Whether the client closed its socket entirely (never blocks)."""
        ...

    def cut(self) -> None:
        """End the connection (it cancels its own scope)."""
        ...


@attrs.define(eq=False)
class HangupWatch:
    """Ends connections whose client left while a reply was long owed.

    The relay does not read the client while it waits for the agent (the
    protocol is lockstep), so a client that gives up on a touch that never
    comes would otherwise pin two descriptors for as long as the agent
    takes. While some connection waits for a reply, once a second this
    looks at those that have waited that long and asks the kernel whether
    their client hung up (POLLHUP: a full close, not a half-close that still
    wants its reply). While no reply is owed, it sleeps without a timer:
    an idle daemon is not woken by it.
    """

    # Each waiter and since when (trio time) it has waited.
    _waiting: dict[Waiter, float] = attrs.Factory(dict)
    # Set when the first waiter arrives; the watch sleeps on it while idle.
    _someone_waiting: trio.Event = attrs.Factory(trio.Event)

    def start_waiting(self, waiter: Waiter) -> None:
        self._waiting[waiter] = trio.current_time()
        if not self._someone_waiting.is_set():
            self._someone_waiting.set()

    def stop_waiting(self, waiter: Waiter) -> None:
        del self._waiting[waiter]

    @property
    def waiting(self) -> int:
        """How many connections wait for a reply now."""
        return len(self._waiting)

    async def run(self) -> None:
        """Check the waiters once a second while there are any; never return."""
        while True:
            if not self._waiting:
                self._someone_waiting = trio.Event()
                await self._someone_waiting.wait()
            await trio.sleep(_CLIENT_CHECK_INTERVAL)
            now = trio.current_time()
            for waiter, since in list(self._waiting.items()):
                if now - since >= _CLIENT_CHECK_INTERVAL and waiter.client_hung_up():
                    waiter.cut()
