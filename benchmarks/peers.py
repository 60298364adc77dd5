"""The prior art as yardsticks: jmmv's ssh-agent-switcher, Go and Rust builds.

They run beside switcher in the same interleaved rounds so that the
comparison is a ratio taken under the same machine load. They are not part
of this project and never shipped with it: the benchmark looks for them in
a directory given by ``--peers`` or ``$SWITCHER_BENCH_PEERS`` (default
``/work/shared/peers``) and skips them, saying why, when they are absent.

Both rescan the agents dirs on every connection and expect sockets laid out
as sshd makes them (``DIR/ssh-XXXX/agent.N``), which is what run.py builds.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PEERS_ENV = "SWITCHER_BENCH_PEERS"
DEFAULT_PEERS_DIR = Path("/work/shared/peers")

# The builds' file names in that directory, by the short name reports use.
BINARIES = {
    "go": "ssh-agent-switcher-go",  # commit 186b183, a goroutine per connection
    "rust": "ssh-agent-switcher-rust",  # 1.0.1, serves connections one at a time
}


def peers_dir(option: str | None) -> Path:
    return Path(option or os.environ.get(PEERS_ENV) or DEFAULT_PEERS_DIR)


def find(directory: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The peer builds present and runnable, and a reason for each one skipped."""
    found: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name, filename in BINARIES.items():
        path = directory / filename
        if not path.is_file():
            skipped[name] = f"{path} not found (pass --peers DIR or set {PEERS_ENV})"
        elif not os.access(path, os.X_OK):
            skipped[name] = f"{path} is not executable"
        else:
            found[name] = path
    return found, skipped


def argv(name: str, binary: Path, sock: Path, agents: Path, root: Path) -> list[str]:
    if name == "go":
        # Logs go to stderr, which run() sends to a file.
        return [str(binary), "-socketPath", str(sock), "-agentsDirs", str(agents)]
    # Without --log-file and --pid-file it writes under ~/.local/state.
    return [
        str(binary),
        *("--socket-path", str(sock)),
        *("--agents-dirs", str(agents)),
        *("--log-file", str(root / "peer.log")),
        *("--pid-file", str(root / "peer.pid")),
    ]


@contextmanager
def run(
    name: str,
    binary: Path,
    root: Path,
    agents: Path,
    ready: Callable[[Path], bool],
    wait_for: Callable[[Callable[[], bool], str], None],
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run one peer build in the foreground on ``root/s.sock`` until the block ends."""
    root.mkdir()
    sock = root / "s.sock"
    with (root / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            argv(name, binary, sock, agents, root),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_for(lambda: ready(sock), f"{name} peer at {sock}")
        yield process, sock
    finally:
        process.terminate()  # the Go build exits 1 on SIGTERM: expected
        process.wait(timeout=10)
