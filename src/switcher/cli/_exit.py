"""Exit statuses and the one-line error every command prints: shared by all commands.

Standard library only, imported by every command module; it imports none of
them, so the commands never import each other for these.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_REFUSED = 1  # the daemon refused to start, or refused a request
EXIT_USAGE = 2  # argparse's own code for bad flags
EXIT_ALREADY_RUNNING = 3  # `switcher daemon`: another switcher serves the socket path
EXIT_NO_DAEMON = 3  # `switcher ctl`: nothing listens on the control path
EXIT_INTERRUPTED = 130  # 128 + SIGINT: the shell's convention for Ctrl-C


def fail(message: str) -> None:
    """One line on stderr, in the shape users grep for."""
    print(f"switcher: {message}", file=sys.stderr)
