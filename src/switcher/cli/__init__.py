"""The command line: argument parsing, logging set-up, and ``trio.run``.

Only ``switcher daemon`` loads trio and structlog; ``switcher path`` (and
later ``ctl`` and ``init``) stay on the standard library so that a login
script can call them without paying for the event loop.
"""

from switcher.cli._main import main

__all__ = ["main"]
