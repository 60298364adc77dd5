"""structlog set-up: JSON lines, configured once, at start-up."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str, log_file: Path | None) -> TextIO:
    """Send JSON lines at ``level`` and above to ``log_file`` (appending) or stderr."""
    # Line-buffered: each event reaches the file whole, at once, for `tail -f`.
    stream = log_file.open("a", buffering=1, encoding="utf-8") if log_file else sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    return stream
