"""structlog set-up, configured once, at start-up: JSON lines, or lines for people.

Files and pipes get JSON lines (what ``--log-file`` and journald want).
A terminal gets structlog's console rendering, unless ``--log-format``
says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class LogSink:
    """Where JSON lines go: a file opened for appending, or stderr.

    Logging must never take the daemon down: a full disk, a removed log
    directory or a closed stderr drops lines instead of raising into the code
    that logged. Each line is one ``write(2)`` on an ``O_APPEND``
    descriptor, so lines from concurrent writers never interleave and a
    reader (``tail -f``) never sees half an event.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd = self._open() if path is not None else 2

    def _open(self) -> int:
        assert self.path is not None
        # O_NOFOLLOW: a symlink planted at the path (in a shared directory)
        # must not make us append to whatever file it names.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(self.path, flags, 0o600)

    def reopen(self) -> None:
        """Start a new file at the same path (after logrotate moved the old one)."""
        if self.path is None:
            return
        fd = self._open()
        old, self._fd = self._fd, fd
        os.close(old)

    def close(self) -> None:
        if self.path is not None:
            os.close(self._fd)

    def msg(self, line: bytes) -> None:
        """Write one rendered line (``render_line`` gives it, newline included)."""
        # A failed or short write (the disk filled mid-line) loses this line
        # only; there is nowhere better to report it.
        with contextlib.suppress(OSError):
            os.write(self._fd, line)

    # structlog calls the method named after the event's level.
    debug = info = warning = warn = error = critical = exception = fatal = msg


def render_line(event: dict[str, object], *, default: Callable[[object], object]) -> bytes:
    """One event as a JSON line, newline included.

    orjson renders the per-connection line in a sixth of the standard
    library's time (docs/BENCHMARKS.md). The fields are the same; only the
    spacing differs, and non-ASCII text is UTF-8 instead of ``\\u`` escapes.
    What orjson refuses (a lone surrogate from an undecodable file name, an
    integer beyond 64 bits) goes through the standard library, as before,
    rather than raise into the code that logged.
    """
    try:
        return orjson.dumps(event, default=default, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError is one
        return (json.dumps(event, default=default) + "\n").encode("utf-8", "backslashreplace")


def for_people(log_format: str, log_file: Path | None) -> bool:
    """Whether lines go to a person: ``console``, or ``auto`` with stderr a terminal."""
    if log_format == "auto":
        return log_file is None and os.isatty(2)
    return log_format == "console"


def _console_line(_logger: object, _name: str, rendered: object) -> bytes:
    """Hand the console renderer's text to the sink as one line of bytes."""
    return (f"{rendered}\n").encode("utf-8", "backslashreplace")


def configure_logging(level: str, log_file: Path | None, log_format: str = "auto") -> LogSink:
    """Send events at ``level`` and above to ``log_file`` (appending) or stderr.

    JSON lines, byte for byte as ever, unless ``for_people`` says a person
    reads them: then structlog's console renderer.
    """
    sink = LogSink(log_file)
    renderers: list[structlog.typing.Processor]
    if for_people(log_format, log_file):
        renderers = [
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            # Plain tracebacks: a fancier formatter would print local
            # variables, and a relay frame's locals may be a passphrase.
            structlog.dev.ConsoleRenderer(
                colors="NO_COLOR" not in os.environ,
                exception_formatter=structlog.dev.plain_traceback,
            ),
            _console_line,
        ]
    else:
        renderers = [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks without local variables: a relay frame's locals are
            # request bytes, and those may be a passphrase.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=render_line),
        ]
    structlog.configure(
        processors=[
            # Context a task bound for itself (a proxy connection: the client's pid and uid).
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_args: sink,
        cache_logger_on_first_use=True,
    )
    return sink
