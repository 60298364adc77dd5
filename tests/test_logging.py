"""Log rendering: JSON lines with the same fields whichever encoder renders them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.processors import _json_fallback_handler

from switcher.cli._logging import configure_logging, render_line

# The per-connection event, with the value types the relay logs.
CONNECTION_CLOSED: dict[str, object] = {
    "client_pid": 4242,
    "client_uid": 1000,
    "outcome": "ok",
    "duration_ms": 0.123,
    "backend": "af51fe1d",
    "requests": {"REQUEST_IDENTITIES": 1, "SIGN_REQUEST": 2},
    "replies": 3,
    "answered_locally": 0,
    "failovers": 0,
    "bytes_in": 5,
    "bytes_out": 75,
    "path": "/tmp/ssh-é/agent.1",
    "event": "switcher.proxy.connection_closed",
    "level": "info",
    "timestamp": "2026-11-30T19:47:25.378238Z",
}


def _stdlib_line(event: dict[str, object]) -> bytes:
    """How structlog's default JSONRenderer rendered a line before orjson."""
    return (json.dumps(event, default=_json_fallback_handler) + "\n").encode(
        "utf-8", "backslashreplace"
    )


class TestRenderLine:
    def test_same_fields_as_the_standard_library(self) -> None:
        """The line parses to exactly the event the standard library's line parses to."""
        line = render_line(CONNECTION_CLOSED, default=_json_fallback_handler)
        assert (line.endswith(b"\n"), line.count(b"\n"), json.loads(line)) == (
            True,
            1,
            json.loads(_stdlib_line(CONNECTION_CLOSED)),
        )

    @pytest.mark.parametrize(
        "value",
        [
            os.fsdecode(b"/tmp/ssh-\xff/agent.1"),  # an undecodable name: a lone surrogate
            2**70,  # beyond what orjson encodes
            object(),  # anything else: its repr, as structlog's fallback gives
        ],
        ids=["surrogate", "big-int", "object"],
    )
    def test_what_orjson_refuses_still_renders(self, value: object) -> None:
        """A value orjson cannot encode gives the standard library's fields, not an exception."""
        event = {"event": "switcher.prober.health_changed", "path": value}
        line = render_line(event, default=_json_fallback_handler)
        assert json.loads(line) == json.loads(_stdlib_line(event))


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_structlog")
def test_each_event_is_one_json_line_in_the_file(tmp_path: Path) -> None:
    """Events at or above the level reach the file as one parseable line each."""
    sink = configure_logging("info", tmp_path / "daemon.log")
    try:
        log = structlog.get_logger()
        log.debug("switcher.test.hidden")
        log.info("switcher.test.shown", client_pid=1, reason="naïve")
        log.warning("switcher.test.warned", outcome="ok")
    finally:
        sink.close()
    events = [json.loads(line) for line in (tmp_path / "daemon.log").read_bytes().splitlines()]
    assert [(e["event"], e["level"], "timestamp" in e) for e in events] == [
        ("switcher.test.shown", "info", True),
        ("switcher.test.warned", "warning", True),
    ]
    assert events[0]["reason"] == "naïve"
