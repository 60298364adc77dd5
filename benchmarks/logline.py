"""What the one log line per connection costs, rendered as the daemon renders it.

Configures logging exactly as `switcher daemon` does (info level, a file),
then times `switcher.proxy.connection_closed` with the relay's fields, next
to the same pipeline with structlog's default `json.dumps` renderer, in
alternating rounds. Medians of the rounds, microseconds per line.

    python benchmarks/logline.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import timeit
from pathlib import Path

import structlog

from switcher.cli._logging import configure_logging

# The per-connection event as the relay logs it after one identities request.
FIELDS: dict[str, object] = {
    "client_pid": 4242,
    "client_uid": 1000,
    "outcome": "ok",
    "duration_ms": 0.123,
    "backend": "af51fe1d",
    "requests": {"REQUEST_IDENTITIES": 1},
    "replies": 1,
    "answered_locally": 0,
    "failovers": 0,
    "bytes_in": 5,
    "bytes_out": 75,
}
LINES_PER_ROUND = 20000


def _stdlib_renderer() -> None:
    """Swap the last processor for structlog's default renderer (str lines)."""
    config = structlog.get_config()
    processors = list(config["processors"])
    processors[-1] = structlog.processors.JSONRenderer()
    sink = config["logger_factory"]()

    def write(line: str) -> None:
        sink.msg((line + "\n").encode("utf-8", "backslashreplace"))

    class Sink:
        info = staticmethod(write)

    structlog.configure(processors=processors, logger_factory=lambda *_a: Sink())


def per_line(log_file: Path, *, stdlib: bool) -> float:
    structlog.reset_defaults()
    sink = configure_logging("info", log_file)
    if stdlib:
        _stdlib_renderer()
    log = structlog.get_logger()
    try:
        seconds = timeit.timeit(
            lambda: log.info("switcher.proxy.connection_closed", **FIELDS),
            number=LINES_PER_ROUND,
        )
    finally:
        sink.close()
    return seconds / LINES_PER_ROUND * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"orjson": [], "json.dumps": []}
    with tempfile.TemporaryDirectory(prefix="swl-") as tmp:
        log_file = Path(tmp) / "daemon.log"
        for _ in range(args.rounds):
            results["orjson"].append(per_line(log_file, stdlib=False))
            results["json.dumps"].append(per_line(log_file, stdlib=True))
    print(json.dumps({name: round(statistics.median(v), 2) for name, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
