"""The daemon's signals from before its socket exists until trio takes them over.

Whoever can see the socket file may signal the daemon at once, and a login
script that starts it may be killed a moment later. Without a handler,
SIGHUP would kill it and SIGTERM would leave its socket behind. So
``switcher daemon`` holds these signals from its first step, before it
binds, and hands what it held to trio's signal receiver once the event loop
runs: a stop request is then honoured like any other, and a SIGHUP becomes
a refresh. Standard library only: the already-running check must not pay
for more.
"""

from __future__ import annotations

import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType

# Each stops the daemon gracefully: stop accepting, drain, remove the sockets.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
# Never stops it: the daemon reopens its log file and refreshes.
RELOAD_SIGNAL = signal.SIGHUP
HANDLED = (*STOP_SIGNALS, RELOAD_SIGNAL)


class HeldSignals:
    """Holds the daemon's signals, in the order they came, until ``hand_over``.

    ``install`` replaces the default actions (which would kill the process)
    with a handler that only records the signal; trio's receiver replaces
    that handler in turn, and ``hand_over`` raises again whatever was held
    so that the receiver sees it. Nothing is lost in between: a signal is
    handled by whichever handler is installed when Python runs it.
    """

    def __init__(self) -> None:
        self._held: list[int] = []

    def install(self) -> None:
        for signum in HANDLED:
            signal.signal(signum, self._hold)

    def _hold(self, signum: int, _frame: FrameType | None) -> None:
        self._held.append(signum)

    @property
    def held(self) -> tuple[int, ...]:
        return tuple(self._held)

    def hand_over(self) -> None:
        """Raise every held signal again, in order, for the handlers installed now."""
        held, self._held = self._held, []
        for signum in held:
            signal.raise_signal(signum)

    def restore_defaults(self) -> None:
        """Give the signals their usual actions back (and forget what was held).

        For the process that waits for a detached daemon to report: Ctrl-C
        must still interrupt it.
        """
        for signum in HANDLED:
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, default)
        self._held.clear()
