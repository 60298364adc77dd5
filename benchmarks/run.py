"""switcher's proxy against a direct ssh-agent, side by side, as ratios.

One command (see docs/BENCHMARKS.md):

    python benchmarks/run.py [--rounds 5] [--quick] [--json]

It starts a real OpenSSH ssh-agent holding a key, presents it as a forwarded
session (a /tmp/ssh-*/agent.* style socket) to two switcher daemons, one
with a clean agents dir and one crowded with 3000 unrelated entries and 30
dead sessions, and measures, interleaving direct and proxied runs
(A B A B ...) so that drift in machine load hits both alike:

  (a) a new connection per request, from several client processes;
  (b) one connection, many REQUEST_IDENTITIES;
  (c) one connection, many SIGN_REQUESTs;
  (d) (a) through the crowded daemon against the clean one;
  (e) the daemon's RSS idle and with 500 idle client connections open;
  (f) start-up: `switcher ctl list` and an already-running
      `switcher daemon --daemon` against `python3 -c pass` (benchmarks/startup.py);
  (g) the time from a new session's socket appearing to its first use.

Figures are medians over the rounds; ratios are proxied/direct (higher is
better, 1.0 means switcher costs nothing).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import agentbench as ab

from switcher.paths import socket_answers

HERE = Path(__file__).resolve().parent

# Targets from issue 7: ratio floors (proxied/direct) and absolute ceilings.
TARGETS = {
    "a_new_connection": 0.30,
    "b_identities_one_connection": 0.60,
    "c_sign_one_connection": 0.95,
    "d_crowded_over_clean": 0.90,
}
IDLE_RSS_CEILING_MB = 40.0
IDLE_CONNECTIONS = 500
IDLE_CONNECTIONS_RSS_CEILING_MB = 25.0
FIRST_USE_CEILING_S = 1.0

CROWD_ENTRIES = 3000
STALE_SESSIONS = 30


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


@contextmanager
def ssh_agent(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(path)], stdout=subprocess.DEVNULL)
    try:
        _wait_for(lambda: socket_answers(path), f"ssh-agent at {path}")
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def ssh_add(sock: Path, key: Path) -> None:
    subprocess.run(
        ["ssh-add", "-q", str(key)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)}, check=True
    )


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@contextmanager
def socat_relay(path: Path, target: Path) -> Iterator[Path | None]:
    """A compiled relay for reference: socat forks one process per connection.

    Not switcher's design (no discovery, no failover, no framing checks), but
    a fair yardstick for what relaying through one more process costs.
    """
    if shutil.which("socat") is None:
        yield None
        return
    process = subprocess.Popen(
        ["socat", f"UNIX-LISTEN:{path},fork,mode=600", f"UNIX-CONNECT:{target}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: socket_answers(path), "socat")
        yield path
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def switcher_daemon(root: Path, agents: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    root.mkdir()
    sock = root / "s.sock"
    argv = [
        sys.executable,
        "-m",
        "switcher",
        "daemon",
        "--socket-path",
        str(sock),
        "--control-path",
        str(root / "c.sock"),
        "--agents-dirs",
        str(agents),
        "--log-file",
        str(root / "daemon.log"),
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    process = subprocess.Popen(argv)
    try:
        _wait_for(lambda: socket_answers(sock), "switcher daemon")
        yield process, sock
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


def crowd(agents: Path, live_socket: Path) -> None:
    """3000 unrelated entries and 30 dead sessions (newer than the live one) beside it."""
    for i in range(CROWD_ENTRIES):
        if i % 3 == 0:
            (agents / f"systemd-private-{i:05d}").mkdir()
        else:
            (agents / f"tmp.{i:05d}").write_bytes(b"")
    time.sleep(0.02)  # the dead sessions are newer: they would win if they were alive
    for i in range(STALE_SESSIONS):
        session = agents / f"ssh-stale{i:05d}"
        session.mkdir(mode=0o700)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(session / f"agent.{i}"))
    assert live_socket.exists()


def interleaved(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run each measurement once per round, in turn (A B A B ...)."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return results


def measure(args: argparse.Namespace) -> dict[str, Any]:
    scale = 0.2 if args.quick else 1.0
    n_new = int(1500 * scale)
    n_ident = int(5000 * scale)
    n_sign = int(2000 * scale)
    workers = args.workers
    tmp = Path(tempfile.mkdtemp(prefix="swb-", dir="/tmp"))
    report: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
            "openssh": subprocess.run(
                ["ssh", "-V"], capture_output=True, text=True, check=False
            ).stderr.strip(),
        },
        "rounds": args.rounds,
        "workers": workers,
    }
    try:
        key = keygen(tmp / "id")
        clean, crowded = tmp / "clean", tmp / "crowded"
        clean.mkdir()
        crowded.mkdir()
        live = clean / "ssh-live000001" / "agent.1"
        with ssh_agent(live):
            ssh_add(live, key)
            (crowded / "ssh-live000001").mkdir(mode=0o700)
            os.link(live, crowded / "ssh-live000001" / "agent.1")  # the same agent, both dirs
            crowd(crowded, live)
            with (
                switcher_daemon(tmp / "d1", clean) as (daemon, proxied),
                switcher_daemon(tmp / "d2", crowded) as (_, crowded_sock),
                socat_relay(tmp / "socat.sock", live) as socat,
                multiprocessing.get_context("fork").Pool(workers) as pool,
            ):
                blob = ab.first_key_blob(str(proxied))
                ident, sign = ab.identities_request(), ab.sign_request(blob)
                # Warm up every path once (imports, caches, first probes).
                for path in (live, proxied, crowded_sock):
                    ab.new_connection_each(str(path), ident, 50)
                    ab.one_connection(str(path), sign, 20)

                def rate(
                    workload: str, path: Path, request: bytes, count: int, procs: int
                ) -> Callable[[], float]:
                    def run() -> float:
                        per_second, latencies = ab.run_parallel(
                            pool, workload, str(path), request, count, procs
                        )
                        latency_log.setdefault((workload, str(path), request[4]), []).extend(
                            latencies
                        )
                        return per_second

                    return run

                latency_log: dict[tuple[str, str, int], list[float]] = {}
                a_runs = {
                    "direct": rate("new", live, ident, n_new, workers),
                    "proxied": rate("new", proxied, ident, n_new, workers),
                    "crowded": rate("new", crowded_sock, ident, n_new, workers),
                }
                b_runs = {
                    "direct": rate("one", live, ident, n_ident, 1),
                    "proxied": rate("one", proxied, ident, n_ident, 1),
                }
                c_runs = {
                    "direct": rate("one", live, sign, n_sign, 1),
                    "proxied": rate("one", proxied, sign, n_sign, 1),
                }
                if socat is not None:
                    a_runs["socat"] = rate("new", socat, ident, n_new, workers)
                    b_runs["socat"] = rate("one", socat, ident, n_ident, 1)
                    c_runs["socat"] = rate("one", socat, sign, n_sign, 1)
                a = interleaved(args.rounds, a_runs)
                b = interleaved(args.rounds, b_runs)
                c = interleaved(args.rounds, c_runs)

                def latency(path: Path) -> dict[str, float]:
                    values = latency_log[("new", str(path), ab.REQUEST_IDENTITIES)]
                    return {
                        "p50_ms": round(ab.percentile(values, 0.50) * 1000, 3),
                        "p99_ms": round(ab.percentile(values, 0.99) * 1000, 3),
                    }

                report["a_new_connection"] = _ratio(a["proxied"], a["direct"]) | {
                    "direct_latency": latency(live),
                    "proxied_latency": latency(proxied),
                }
                report["b_identities_one_connection"] = _ratio(b["proxied"], b["direct"])
                report["c_sign_one_connection"] = _ratio(c["proxied"], c["direct"])
                if socat is not None:
                    report["socat_reference"] = {
                        "a_new_connection": _ratio(a["socat"], a["direct"], "socat"),
                        "b_identities_one_connection": _ratio(b["socat"], b["direct"], "socat"),
                        "c_sign_one_connection": _ratio(c["socat"], c["direct"], "socat"),
                    }
                report["d_crowded_over_clean"] = _ratio(
                    a["crowded"], a["proxied"], "crowded", "clean"
                )
                report["e_memory"] = memory(daemon.pid, proxied, ident)
                report["g_first_use"] = first_use(tmp, clean, proxied, args.rounds)
        report["f_startup"] = startup(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _ratio(
    a: list[float], b: list[float], a_name: str = "proxied", b_name: str = "direct"
) -> dict[str, Any]:
    ma, mb = statistics.median(a), statistics.median(b)
    return {
        f"{a_name}_per_s": round(ma, 1),
        f"{b_name}_per_s": round(mb, 1),
        "ratio": round(ma / mb, 3),
        "rounds": {a_name: [round(x, 1) for x in a], b_name: [round(x, 1) for x in b]},
    }


def memory(pid: int, proxied: Path, ident: bytes) -> dict[str, Any]:
    """RSS idle, then with many idle clients that each made one request and stayed."""
    time.sleep(0.5)
    idle = ab.rss_kib(pid)
    clients = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            sock = ab.connect(str(proxied))
            ab.roundtrip(sock, ident)
            clients.append(sock)
        time.sleep(0.5)
        loaded = ab.rss_kib(pid)
        fds = ab.fd_count(pid)
    finally:
        for sock in clients:
            sock.close()
    return {
        "idle_rss_mb": round(idle / 1024, 1),
        "with_idle_connections_rss_mb": round(loaded / 1024, 1),
        "added_mb": round((loaded - idle) / 1024, 1),
        "idle_connections": IDLE_CONNECTIONS,
        "daemon_fds_while_open": fds,
    }


def first_use(tmp: Path, agents: Path, proxied: Path, rounds: int) -> dict[str, Any]:
    """Make a new session's socket appear atomically (rename) and time its first use."""
    key2 = keygen(tmp / "id2")
    staging = tmp / "staging" / "agent.2"
    delays = []
    with ssh_agent(staging):
        ssh_add(staging, key2)
        blob2 = ab.first_key_blob(str(staging))
        for i in range(rounds):
            session = agents / f"ssh-new{i:07d}"
            session.mkdir(mode=0o700)
            appeared = time.perf_counter()
            os.rename(staging, session / "agent.2")
            while blob2 not in _identities(proxied):
                time.sleep(0.002)
            delays.append(time.perf_counter() - appeared)
            os.rename(session / "agent.2", staging)  # the session ends
            session.rmdir()
            while blob2 in _identities(proxied):
                time.sleep(0.002)
    return {
        "median_s": round(statistics.median(delays), 3),
        "max_s": round(max(delays), 3),
        "rounds": [round(d, 3) for d in delays],
    }


def _identities(path: Path) -> bytes:
    with ab.connect(str(path)) as sock:
        return ab.roundtrip(sock, ab.identities_request())


def startup(args: argparse.Namespace) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "startup.py"),
            "--json",
            "--rounds",
            str(10 if args.quick else 30),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:] or ["failed"]}
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


def verdicts(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    socat = report.get("socat_reference", {})
    for name, floor in TARGETS.items():
        ratio = report[name]["ratio"]
        reference = f", socat {socat[name]['ratio']:.2f}" if name in socat else ""
        rows.append(
            (
                name,
                f"ratio {ratio:.2f} (target >= {floor:.2f}{reference})",
                "met" if ratio >= floor else "MISSED",
            )
        )
    mem = report["e_memory"]
    rows.append(
        (
            "e_idle_rss",
            f"{mem['idle_rss_mb']} MB (target <= {IDLE_RSS_CEILING_MB:g})",
            "met" if mem["idle_rss_mb"] <= IDLE_RSS_CEILING_MB else "MISSED",
        )
    )
    rows.append(
        (
            "e_500_idle_connections",
            f"+{mem['added_mb']} MB (target <= {IDLE_CONNECTIONS_RSS_CEILING_MB:g})",
            "met" if mem["added_mb"] <= IDLE_CONNECTIONS_RSS_CEILING_MB else "MISSED",
        )
    )
    first = report["g_first_use"]
    rows.append(
        (
            "g_first_use",
            f"median {first['median_s']} s, max {first['max_s']} s (target <= 1 s)",
            "met" if first["max_s"] <= FIRST_USE_CEILING_S else "MISSED",
        )
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="client processes for (a) and (d)")
    parser.add_argument("--quick", action="store_true", help="fewer requests per round")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args()
    report = measure(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(json.dumps({k: v for k, v in report.items() if k != "f_startup"}, indent=2))
    print(json.dumps({"f_startup": report["f_startup"]}, indent=2))
    for name, figure, verdict in verdicts(report):
        print(f"{name:28} {figure:55} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
