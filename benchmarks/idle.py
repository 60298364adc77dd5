"""What the daemon costs while nothing happens: wake-ups and CPU at rest.

switcher runs for weeks on every host its user works on, so its cost at
rest matters more than its speed. This starts the real daemon (``python -m
switcher daemon``) on an agents dir holding N live OpenSSH ``ssh-agent``
sessions (laid out as sshd makes them), lets it settle, and then reads, over
a window of S seconds:

* wake-ups: ``voluntary_ctxt_switches`` from ``/proc/PID/status`` (the main
  thread, which runs the event loop: the issue's measure), and the same
  summed over every thread (worker threads for file-system calls);
* CPU: ``utime + stime`` from ``/proc/PID/stat`` (all threads, in clock
  ticks of 10 ms, too coarse for a budget of 0.3 ms/s over 20 s), and the
  time on CPU from ``/proc/PID/task/*/schedstat`` (nanoseconds, all
  threads), which the targets are judged by.

Then, on the one-agent daemon: how long a new session takes to be used (its
socket appears by rename, as sshd's does, and a client through switcher is
answered by it), and how long a deleted socket of ours takes to come back.

jmmv's ssh-agent-switcher builds (see peers.py) are measured the same way
at rest when present.

    python3 benchmarks/idle.py [--seconds 20] [--agents 1 50] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import run as bench

from switcher.served import socket_answers

# Before the window opens: start-up is done and the first probes answered.
SETTLE_S = 3.0
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def sample(pid: int) -> dict[str, Any]:
    """Counters of one process now: wake-ups and CPU time, per thread where it matters."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    threads: dict[str, tuple[int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a worker thread that just ended
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                switches = next(
                    int(line.split()[1])
                    for line in status
                    if line.startswith("voluntary_ctxt_switches:")
                )
            with open(f"/proc/{pid}/task/{tid}/schedstat") as schedstat:
                threads[tid] = (switches, int(schedstat.read().split()[0]))
    with open(f"/proc/{pid}/stat") as stat:
        after_name = stat.read().rsplit(")", 1)[1].split()
    ticks = int(after_name[11]) + int(after_name[12])  # utime, stime (fields 14 and 15)
    return {
        "main_switches": int(fields["voluntary_ctxt_switches"]),
        "threads": threads,
        "stat_cpu_s": ticks / TICKS_PER_S,
    }


def at_rest(pid: int, seconds: float) -> dict[str, Any]:
    """Per-second rates over a window in which nothing is asked of the process.

    Per-thread counts are taken as differences for each thread alive at
    the end (a thread that starts in the window counts from zero); a worker
    thread that ends inside the window takes its counts with it.
    """
    time.sleep(SETTLE_S)
    before = sample(pid)
    time.sleep(seconds)
    after = sample(pid)
    switches = on_cpu_ns = 0
    for tid, (tid_switches, tid_ns) in after["threads"].items():
        old_switches, old_ns = before["threads"].get(tid, (0, 0))
        switches += tid_switches - old_switches
        on_cpu_ns += tid_ns - old_ns
    return {
        "wakeups_per_s": round((after["main_switches"] - before["main_switches"]) / seconds, 2),
        "wakeups_all_threads_per_s": round(switches / seconds, 2),
        "cpu_ms_per_s": round(on_cpu_ns / 1e6 / seconds, 3),
        "cpu_ms_per_s_from_stat": round(
            (after["stat_cpu_s"] - before["stat_cpu_s"]) * 1000 / seconds, 3
        ),
        "threads": len(after["threads"]),
    }


@contextlib.contextmanager
def sessions(agents: Path, count: int) -> Iterator[list[Path]]:
    """``count`` live ssh-agents, each in its own sshd-style session dir."""
    with contextlib.ExitStack() as stack:
        paths = []
        for i in range(count):
            path = agents / f"ssh-idle{i:06d}" / "agent.1"
            stack.enter_context(bench.ssh_agent(path))
            paths.append(path)
        yield paths


def socket_comes_back(sock: Path, rounds: int) -> dict[str, Any]:
    """Delete the daemon's socket and time until it is there and answering again."""
    delays = []
    for _ in range(rounds):
        sock.unlink()
        gone = time.perf_counter()
        while not socket_answers(sock):
            time.sleep(0.002)
        delays.append(time.perf_counter() - gone)
        time.sleep(0.2)
    return {"median_s": round(statistics.median(delays), 3), "max_s": round(max(delays), 3)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"seconds": args.seconds, "switcher": {}, "peers": {}}
    tmp = Path(tempfile.mkdtemp(prefix="swi-", dir="/tmp"))
    try:
        for count in args.agents:
            agents = tmp / f"agents{count}"
            agents.mkdir()
            with (
                sessions(agents, count),
                bench.switcher_daemon(tmp / f"d{count}", agents) as (process, sock),
            ):
                figures = at_rest(process.pid, args.seconds)
                if count == min(args.agents):
                    (tmp / f"new{count}").mkdir()
                    figures["new_session_used"] = bench.first_use(
                        tmp / f"new{count}", agents, sock, args.rounds
                    )
                    figures["socket_recreated"] = socket_comes_back(sock, args.rounds)
                report["switcher"][count] = figures
        found, skipped = peers.find(peers.peers_dir(args.peers))
        report["peers_skipped"] = skipped
        for name, binary in found.items():
            agents = tmp / f"peer-agents-{name}"
            agents.mkdir()
            with (
                sessions(agents, 1),
                peers.run(name, binary, tmp / f"peer-{name}", agents, socket_answers, _wait) as (
                    process,
                    _sock,
                ),
            ):
                report["peers"][name] = at_rest(process.pid, args.seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="the window (default 20)")
    parser.add_argument(
        "--agents", type=int, nargs="+", default=[1, 50], help="live agents (default 1 50)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="new sessions and socket deletions")
    parser.add_argument("--peers", help="directory of jmmv's builds (see peers.py)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = measure(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"at rest over {args.seconds:g} s (after {SETTLE_S:g} s to settle):")
    rows = [(f"switcher, {n} agent(s)", f) for n, f in report["switcher"].items()]
    rows += [(f"jmmv {name}, 1 agent", f) for name, f in report["peers"].items()]
    for label, f in rows:
        print(
            f"  {label:24} {f['wakeups_per_s']:6.2f} wake-ups/s "
            f"({f['wakeups_all_threads_per_s']:.2f} all threads)  "
            f"{f['cpu_ms_per_s']:6.3f} ms CPU/s "
            f"({f['cpu_ms_per_s_from_stat']:.1f} from /proc/PID/stat)"
        )
    for name, reason in report["peers_skipped"].items():
        print(f"  jmmv {name}: skipped, {reason}")
    first = report["switcher"][min(args.agents)]
    print(f"new session used: {first['new_session_used']}")
    print(f"own socket re-created: {first['socket_recreated']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
