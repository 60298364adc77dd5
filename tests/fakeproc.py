"""A fixture /proc tree: processes as directories of stat and environ files, no real processes.

Ownership is real: a process of "another user" or one that is not dumpable (sshd's
session process) is a directory owned by another uid, as the kernel shows them. Making
such directories needs root; without it, tests that need them skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from switcher.core._backend import Backend, Health, Snapshot, backend_id
from switcher.core._discovery import Layout

# When the tests run as root, "our" processes belong to this uid, sshd's session process
# to root (not dumpable), and another user's to OTHER_UID.
TEST_UID = 4242
OTHER_UID = 4243

BOOT_TIME = 1_700_000_000  # the fixture machine's btime
TICKS = os.sysconf("SC_CLK_TCK")


class FakeProc:
    """Builds processes under ``root`` as /proc shows them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)
        (root / "stat").write_text(f"cpu  1 2 3 4\nbtime {BOOT_TIME}\nprocesses 99\n")
        self.uid = TEST_UID if os.geteuid() == 0 else os.getuid()

    def add(
        self,
        pid: int,
        ppid: int,
        *,
        comm: str = "bash",
        start: int = 1000,
        tty: int = 0,
        env: dict[str, str] | None = None,
        owner: str = "me",
        environ_readable: bool = True,
    ) -> int:
        """Add one process; ``owner`` is "me", "root" (not dumpable) or "other"."""
        directory = self.root / str(pid)
        directory.mkdir()
        rest = ["S", ppid, pid, pid, tty, -1, 4194304, *([0] * 8), 20, 0, 1, 0, start, 1234]
        (directory / "stat").write_text(f"{pid} ({comm}) {' '.join(map(str, rest))}\n")
        if environ_readable:
            entries = [f"{k}={v}" for k, v in {"PATH": "/usr/bin", **(env or {})}.items()]
            (directory / "environ").write_bytes(b"\0".join(e.encode() for e in entries) + b"\0")
        if owner != "me":
            if os.geteuid() != 0:
                pytest.skip("a process of another uid in the fixture needs root to chown")
            uid = 0 if owner == "root" else OTHER_UID
            for path in (directory, *directory.iterdir()):
                os.chown(path, uid, uid)
        elif os.geteuid() == 0:
            for path in (directory, *directory.iterdir()):
                os.chown(path, TEST_UID, TEST_UID)
        return pid

    def epoch(self, start: int) -> float:
        """The wall-clock second a process with this start time began."""
        return BOOT_TIME + start / TICKS


def backend(
    path: str,
    *,
    health: Health = Health.HEALTHY,
    appeared: float = 0.0,
    layout: Layout | None = None,
    ino: int = 0,
) -> Backend:
    """A registry entry for a forwarded socket; the layout follows from the path."""
    if layout is None:
        layout = Layout.TMP if path.startswith("/tmp/") else Layout.AGENT_DIR
    ino = ino or sum(path.encode())
    return Backend(
        id=backend_id(path, 1, ino),
        path=path,
        layout=layout,
        dev=1,
        ino=ino,
        appeared=appeared,
        health=health,
    )


def snapshot(*backends: Backend, pinned: str | None = None) -> Snapshot:
    """The registry's view with these backends, in the order given (already ranked)."""
    return Snapshot(tuple(backends), pinned, 1)
