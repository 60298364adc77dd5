"""The start-up budget: commands a login script or a status line runs stay on the standard library.

`switcher path`, `init`, `ctl` and the already-running answer of `daemon
--daemon` run at every login or every few seconds, so they must start about
as fast as the interpreter (benchmarks/startup.py measures it). What makes
them fast is what they do not import: this is the one test that holds every
one of them to that, so the modules they load need no per-line comments to
say why an import sits inside a function.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import ALLOW_ROOT, PID_NAME, SWITCHER, Reaper, daemon_flags

# Never loaded by a light command: the event loop, logging, attrs, the daemon's
# packages, and modules whose import alone costs milliseconds (typing, hashlib).
HEAVY = (
    "trio",
    "structlog",
    "attr",
    "attrs",
    "typing",
    "hashlib",
    "switcher.core",
    "switcher.control",
    "switcher.daemon",
    "switcher.config",
)

# Runs one command in-process and reports its status and which heavy modules it loaded.
PROBE = textwrap.dedent(
    """
    import sys
    # What the interpreter (and coverage, under CI) loaded before switcher is not its cost.
    before = set(sys.modules)
    import contextlib, io, json
    from switcher.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(sys.argv[1:])
    heavy = tuple(json.loads(sys.stdin.read()))
    new = set(sys.modules) - before
    loaded = sorted(m for m in new if any(m == h or m.startswith(h + ".") for h in heavy))
    print(json.dumps([status, loaded]))
    """
)


def loaded_by(*argv: str) -> list[object]:
    """Run ``switcher ARGV`` in a fresh interpreter; its status and the heavy modules loaded.

    Not under coverage (the tests session measures subprocesses too): coverage itself
    imports typing and hashlib, which is not what a user's command loads.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_PROCESS_")}
    result = subprocess.run(
        [SWITCHER[0], "-c", PROBE, *argv],
        input=json.dumps(HEAVY),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    loaded: list[object] = json.loads(result.stdout)
    return loaded


@pytest.fixture
def running(short_tmp: Path) -> Iterator[Path]:
    """A detached daemon whose sockets, pid file and log are in ``short_tmp``."""
    reaper = Reaper()
    try:
        subprocess.run(
            [*SWITCHER, "daemon", "--daemon", *daemon_flags(short_tmp)],
            capture_output=True,
            timeout=60,
            check=True,
        )
        reaper.adopt_pid_file(short_tmp / PID_NAME)
        yield short_tmp
    finally:
        reaper.kill_all()


class TestImportBudget:
    def test_path(self) -> None:
        """`switcher path` loads nothing heavy."""
        assert loaded_by("path") == [0, []]

    def test_init(self) -> None:
        """`switcher init` loads nothing heavy (it runs at every login)."""
        assert loaded_by("init", *ALLOW_ROOT, "bash") == [0, []]

    def test_daemon_already_running(self, running: Path) -> None:
        """`switcher daemon --daemon` answers "already running" without loading anything heavy."""
        assert loaded_by("daemon", "--daemon", *daemon_flags(running)) == [0, []]

    def test_ctl(self, running: Path) -> None:
        """A whole `switcher ctl status` loads nothing heavy."""
        control = os.fspath(running / "c.sock")
        assert loaded_by("ctl", "--control-path", control, "status") == [0, []]

    def test_stop(self, short_tmp: Path) -> None:
        """`switcher stop` loads nothing heavy either (here it finds no daemon: exit 3)."""
        control = os.fspath(short_tmp / "c.sock")
        assert loaded_by("stop", "--control-path", control) == [3, []]
