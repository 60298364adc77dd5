"""Running switcher for real, in a subprocess, the way users do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

SWITCHER = [sys.executable, "-m", "switcher"]

# CI runs as root, and the daemon refuses root unless told otherwise.
ALLOW_ROOT = ["--allow-root"] if os.geteuid() == 0 else []


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SWITCHER, *args], capture_output=True, text=True, timeout=60, check=False)


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


@attrs.define(eq=False)
class Daemon:
    process: trio.Process
    socket_path: Path
    control_path: Path
    log_path: Path

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return await self.process.wait()


async def start_daemon(tmp: Path, *extra: str, agents: Sequence[Path] = ()) -> Daemon:
    """Start ``switcher daemon`` and wait until its socket accepts connections."""
    socket_path = tmp / "s.sock"
    control_path = tmp / "c.sock"
    log_path = tmp / "daemon.log"
    agents_dirs = ":".join(str(a) for a in agents) or str(tmp / "none")
    process = await trio.lowlevel.open_process(
        [
            *SWITCHER,
            "daemon",
            *ALLOW_ROOT,
            "--socket-path",
            str(socket_path),
            "--control-path",
            str(control_path),
            "--agents-dirs",
            agents_dirs,
            "--log-file",
            str(log_path),
            *extra,
        ]
    )
    while not accepts(socket_path):
        if process.poll() is not None:
            raise AssertionError(f"daemon exited with {process.returncode} before listening")
        await trio.sleep(0.02)
    return Daemon(process, socket_path, control_path, log_path)


