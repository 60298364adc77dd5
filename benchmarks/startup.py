"""How long `switcher ctl list` takes against a running daemon, next to a bare `python -c pass`.

`switcher ctl` is meant for tmux status lines and shell prompts, so it must
start about as fast as the interpreter itself: it loads only the standard
library. This script starts its own daemon (empty agents dir) in a short
temporary directory, times the commands interleaved (A B C A B C ...) so
drift in machine load hits all alike, and reports medians and their ratio to
the bare interpreter. `switcher path` (no daemon involved) is there to tell
the command line's own import cost from the round trip to the daemon.

    python benchmarks/startup.py [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Enough runs for a stable median on a quiet machine, few enough to take seconds.
DEFAULT_ROUNDS = 30
# A daemon that is not listening after this long has failed to start.
START_TIMEOUT_S = 20.0
# SIGTERM gives in-flight connections a grace period; this bounds the wait.
STOP_TIMEOUT_S = 10.0
# One unmeasured run of each command first, so the page cache is warm and
# switcher's bytecode cache is written.
WARMUP_RUNS = 1
# Children run as users run them: a developer's PYTHONDONTWRITEBYTECODE would
# make every run recompile switcher's modules (installed packages come with
# their bytecode cache), and PYTHONUNBUFFERED is not what users have either.
CHILD_ENV = {
    k: v for k, v in os.environ.items() if k not in {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
}


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False
        return True


def start_daemon(python: str, tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `switcher daemon` in ``tmp`` and wait until its control socket accepts."""
    agents = tmp / "agents"
    agents.mkdir()
    control = tmp / "c.sock"
    log = tmp / "daemon.log"
    # The daemon refuses root unless told it is on purpose (CI containers run as root).
    as_root = ["--allow-root"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [
            *(python, "-m", "switcher", "daemon"),
            *("--socket-path", str(tmp / "a.sock")),
            *("--control-path", str(control)),
            *("--agents-dirs", str(agents)),
            *("--log-file", str(log)),
            *as_root,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=CHILD_ENV,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _accepts(control):
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            raise SystemExit(f"the daemon exited with {process.returncode}: {stderr.strip()}")
        if time.monotonic() > deadline:
            stop_daemon(process)
            raise SystemExit(f"the daemon did not listen on {control} within {START_TIMEOUT_S} s")
        time.sleep(0.02)
    return process, control


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr:
        process.stderr.close()


def daemon_already_running(python: str, tmp: Path) -> list[str]:
    """`switcher daemon --daemon` against the daemon `start_daemon` runs in ``tmp``.

    What a login script runs at every login: the answer "already running"
    (exit 0, nothing started) must come without loading trio or structlog.
    The pid and log files point into ``tmp`` so that, were the check ever to
    start a daemon after all, nothing lands in the real home directory.
    """
    as_root = ["--allow-root"] if os.geteuid() == 0 else []
    return [
        *(python, "-m", "switcher", "daemon", "--daemon", *as_root),
        *("--socket-path", str(tmp / "a.sock"), "--control-path", str(tmp / "c.sock")),
        *("--pid-file", str(tmp / "second.pid"), "--log-file", str(tmp / "second.log")),
        *("--agents-dirs", str(tmp / "agents")),
    ]


def time_once(argv: list[str]) -> float:
    """Wall time of one run, in seconds; a failing run stops the benchmark."""
    start = time.perf_counter()
    result = subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, env=CHILD_ENV
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{argv} exited {result.returncode}: {result.stderr.decode().strip()}")
    return elapsed


def measure(commands: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    """Run each command once per round, in turn, and collect the times."""
    for argv in commands.values():
        for _ in range(WARMUP_RUNS):
            time_once(argv)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, argv in commands.items():
            samples[name].append(time_once(argv))
    return samples


def summarize(samples: dict[str, list[float]], baseline: str) -> dict[str, object]:
    base = statistics.median(samples[baseline])
    rows = {
        name: {
            "median_ms": round(statistics.median(times) * 1000, 2),
            "min_ms": round(min(times) * 1000, 2),
            "max_ms": round(max(times) * 1000, 2),
            "ratio": round(statistics.median(times) / base, 2),
        }
        for name, times in samples.items()
    }
    return {"rounds": len(samples[baseline]), "baseline": baseline, "commands": rows}


def print_table(summary: dict[str, object]) -> None:
    commands = summary["commands"]
    assert isinstance(commands, dict)
    width = max(len(name) for name in commands)
    print(f"{summary['rounds']} rounds, interleaved; ratio is against {summary['baseline']}")
    print(f"{'command':<{width}}  {'median':>9}  {'min':>9}  {'max':>9}  {'ratio':>6}")
    for name, row in commands.items():
        print(
            f"{name:<{width}}  {row['median_ms']:>7.1f}ms  {row['min_ms']:>7.1f}ms"
            f"  {row['max_ms']:>7.1f}ms  {row['ratio']:>5.2f}x"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="runs of each command")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--python", default=sys.executable, help="the interpreter with switcher installed"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    # A short directory: Unix socket paths are limited to 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="swb-", dir="/tmp"))
    try:
        daemon, control = start_daemon(args.python, tmp)
        try:
            commands = {
                "switcher ctl list": [
                    *(args.python, "-m", "switcher", "ctl"),
                    *("--control-path", str(control), "list"),
                ],
                # The same imports without the conversation: what the CLI costs by itself.
                "switcher path": [args.python, "-m", "switcher", "path"],
                "switcher daemon --daemon (running)": daemon_already_running(args.python, tmp),
                "python -c pass": [args.python, "-c", "pass"],
            }
            samples = measure(commands, args.rounds)
        finally:
            stop_daemon(daemon)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(samples, baseline="python -c pass")
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
