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
  (g) the time from a new session's socket appearing to its first use;
  (h) an ~86 KB identities answer (300 keys): p50 added over direct.

Beside switcher, in the same rounds, it runs jmmv's ssh-agent-switcher (the
prior art, Go and Rust 1.0.1 builds) when it finds them (--peers DIR, see
benchmarks/peers.py; skipped with the reason otherwise), and socat when it
is installed. `--table` prints the comparison as a Markdown table.

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
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import agentbench as ab
import peers

from switcher.served import socket_answers

HERE = Path(__file__).resolve().parent

# Targets (issue 13): ratio floors against direct, and against the Go build
# of the prior art in the same run (switcher/Go), and absolute ceilings.
TARGETS = {
    "c_sign_one_connection": 0.97,
    "d_crowded_over_clean": 0.90,
}
TARGETS_OVER_GO = {
    "a_new_connection": 1.0,
    "b_identities_one_connection": 1.0,
}
IDLE_RSS_CEILING_MB = 30.0
IDLE_CONNECTIONS = 500
IDLE_CONNECTIONS_RSS_CEILING_MB = 10.0
FIRST_USE_CEILING_S = 1.0

# (h): an identities answer of about 86 KB, as an agent holding 300 RSA
# keys gives. ed25519 keys with a long comment make the same size in a
# fraction of the key generation time; the relay only sees bytes.
LARGE_KEYS = 300
LARGE_COMMENT = "k" * 230
LARGE_REQUESTS = 300
# A relay that has not delivered a whole answer by then has wedged.
LARGE_TIMEOUT_S = 5.0

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


def ssh_add(sock: Path, *keys: Path) -> None:
    subprocess.run(
        ["ssh-add", "-q", *map(str, keys)],
        env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
        check=True,
        stderr=subprocess.DEVNULL,
    )


def keygen(path: Path, comment: str = "switcher-bench") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
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
    found, skipped = peers.find(peers.peers_dir(args.peers))
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
        "peers": {"found": {k: str(v) for k, v in found.items()}, "skipped": skipped},
    }
    try:
        key = keygen(tmp / "id")
        clean, crowded = tmp / "clean", tmp / "crowded"
        clean.mkdir()
        crowded.mkdir()
        live = clean / "ssh-live000001" / "agent.1"
        with ssh_agent(live), ExitStack() as stack:
            ssh_add(live, key)
            (crowded / "ssh-live000001").mkdir(mode=0o700)
            os.link(live, crowded / "ssh-live000001" / "agent.1")  # the same agent, both dirs
            crowd(crowded, live)
            daemon, proxied = stack.enter_context(switcher_daemon(tmp / "d1", clean))
            _, crowded_sock = stack.enter_context(switcher_daemon(tmp / "d2", crowded))
            socat = stack.enter_context(socat_relay(tmp / "socat.sock", live))
            # name -> (process, socket on the clean dir, socket on the crowded dir)
            peer_socks: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
            for name, binary in found.items():
                process, sock = stack.enter_context(
                    peers.run(name, binary, tmp / f"{name}1", clean, socket_answers, _wait_for)
                )
                _, crowded_peer = stack.enter_context(
                    peers.run(name, binary, tmp / f"{name}2", crowded, socket_answers, _wait_for)
                )
                peer_socks[name] = (process, sock, crowded_peer)
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers))
            blob = ab.first_key_blob(str(proxied))
            ident, sign = ab.identities_request(), ab.sign_request(blob)
            # Warm up every path once (imports, caches, first probes).
            warm = [live, proxied, crowded_sock] + [p for _, p, _ in peer_socks.values()]
            for path in warm:
                ab.new_connection_each(str(path), ident, 50)
                ab.one_connection(str(path), sign, 20)

            latency_log: dict[tuple[str, str, int], list[float]] = {}

            def rate(
                workload: str, path: Path, request: bytes, count: int, procs: int
            ) -> Callable[[], float]:
                def run() -> float:
                    per_second, latencies = ab.run_parallel(
                        pool, workload, str(path), request, count, procs
                    )
                    latency_log.setdefault((workload, str(path), request[4]), []).extend(latencies)
                    return per_second

                return run

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
            refs = {"socat": socat} if socat is not None else {}
            refs |= {name: sock for name, (_, sock, _) in peer_socks.items()}
            for name, sock in refs.items():
                a_runs[name] = rate("new", sock, ident, n_new, workers)
                b_runs[name] = rate("one", sock, ident, n_ident, 1)
                c_runs[name] = rate("one", sock, sign, n_sign, 1)
            for name, (_, _, crowded_peer) in peer_socks.items():
                # They rescan on every connection: a crowded dir makes them
                # slow, so fewer connections give the same rate in less time.
                a_runs[f"{name}_crowded"] = rate(
                    "new", crowded_peer, ident, max(20, n_new // 5), workers
                )
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
            report["d_crowded_over_clean"] = _ratio(a["crowded"], a["proxied"], "crowded", "clean")
            report["references"] = {
                name: {
                    "a_new_connection": _ratio(a[name], a["direct"], name)
                    | {"latency": latency(sock)},
                    "b_identities_one_connection": _ratio(b[name], b["direct"], name),
                    "c_sign_one_connection": _ratio(c[name], c["direct"], name),
                }
                for name, sock in refs.items()
            }
            for name in peer_socks:
                report["references"][name]["d_crowded_over_switcher_clean"] = _ratio(
                    a[f"{name}_crowded"], a["proxied"], f"{name}_crowded", "clean"
                )
            report["e_memory"] = memory(daemon.pid, proxied, ident)
            if "go" in peer_socks:
                go_process, go_sock, _ = peer_socks["go"]
                report["references"]["go"]["e_memory"] = memory(go_process.pid, go_sock, ident)
            report["g_first_use"] = first_use(tmp, clean, proxied, args.rounds)
            relays = {"proxied": proxied} | {n: s for n, (_, s, _) in peer_socks.items()}
            report["h_large_answer"] = large_answer(tmp, live, relays, args.rounds, scale)
        report["f_startup"] = startup(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def large_answer(
    tmp: Path, live: Path, relays: dict[str, Path], rounds: int, scale: float
) -> dict[str, Any]:
    """(h): p50 latency of an ~86 KB identities answer, over direct.

    Two ways: a new connection per answer (what `ssh-add -L` does: the
    judged figure), and many answers on one connection (the relaying of the
    bytes alone).
    """
    keys = tmp / "large"
    keys.mkdir()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as executor:
        paths = list(
            executor.map(
                lambda i: keygen(keys / f"k{i:03d}", comment=LARGE_COMMENT), range(LARGE_KEYS)
            )
        )
    ssh_add(live, *paths)
    ident = ab.identities_request()
    with ab.connect(str(live)) as sock:
        size = len(ab.roundtrip(sock, ident)) + 4
    count = max(20, int(LARGE_REQUESTS * scale))
    paths_by_name = {"direct": live} | relays
    workloads = {"new_connection": ab.new_connection_each, "one_connection": ab.one_connection}
    result: dict[str, Any] = {"answer_bytes": size, "keys": LARGE_KEYS}
    for workload, run in workloads.items():
        p50s: dict[str, list[float]] = {name: [] for name in paths_by_name}
        wedged: dict[str, str] = {}
        for _ in range(rounds):
            for name, path in paths_by_name.items():
                if name in wedged:
                    continue
                try:
                    values = run(str(path), ident, count, LARGE_TIMEOUT_S)
                except (TimeoutError, EOFError, OSError) as exc:
                    wedged[name] = f"no whole answer within {LARGE_TIMEOUT_S:g} s ({exc!r})"
                    continue
                p50s[name].append(ab.percentile(values, 0.50))
        direct = statistics.median(p50s["direct"])
        figures: dict[str, Any] = {
            "direct_p50_ms": round(direct * 1000, 3),
            "rounds_p50_ms": {n: [round(v * 1000, 3) for v in vs] for n, vs in p50s.items()},
        }
        for name in relays:
            if name in wedged:
                figures[name] = {"wedged": wedged[name]}
            else:
                p50 = statistics.median(p50s[name])
                figures[name] = {
                    "p50_ms": round(p50 * 1000, 3),
                    "added_ms": round((p50 - direct) * 1000, 3),
                }
        result[workload] = figures
    return result


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
    refs = report.get("references", {})

    def also(name: str) -> str:
        return "".join(
            f", {ref} {refs[ref][name]['ratio']:.2f}"
            for ref in ("go", "rust", "socat")
            if name in refs.get(ref, {})
        )

    for name, floor in TARGETS_OVER_GO.items():
        ratio = report[name]["ratio"]
        if "go" not in refs:
            rows.append((name, f"ratio {ratio:.2f}{also(name)}", "no Go build: not judged"))
            continue
        over_go = ratio / refs["go"][name]["ratio"]
        rows.append(
            (
                name,
                f"switcher/Go {over_go:.2f} (target >= {floor:.2f}; ratio {ratio:.2f}{also(name)})",
                "met" if over_go >= floor else "MISSED",
            )
        )
    for name, floor in TARGETS.items():
        ratio = report[name]["ratio"]
        rows.append(
            (
                name,
                f"ratio {ratio:.2f} (target >= {floor:.2f}{also(name)})",
                "met" if ratio >= floor else "MISSED",
            )
        )
    large = report["h_large_answer"]["new_connection"]
    ours = large["proxied"]
    if "wedged" in ours:
        rows.append(("h_large_answer", "switcher wedged", "MISSED"))
    elif "rust" in large and "added_ms" in large["rust"]:
        rust = large["rust"]["added_ms"]
        rows.append(
            (
                "h_large_answer",
                f"+{ours['added_ms']} ms over direct (target <= Rust's +{rust} ms)",
                "met" if ours["added_ms"] <= rust else "MISSED",
            )
        )
    else:
        rows.append(("h_large_answer", f"+{ours['added_ms']} ms", "no Rust build: not judged"))
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
    commands = report["f_startup"].get("commands", {})
    for name in ("switcher ctl list", "switcher daemon --daemon (running)"):
        if name in commands:
            ratio = commands[name]["ratio"]
            rows.append(
                (
                    name,
                    f"{ratio:.2f}x python3 -c pass (target <= 3x)",
                    "met" if ratio <= 3.0 else "MISSED",
                )
            )
    for name, reason in report["peers"]["skipped"].items():
        rows.append((f"peer {name}", reason, "skipped"))
    return rows


def table(report: dict[str, Any]) -> str:
    """The side-by-side comparison as a Markdown table (switcher/Go per row)."""
    refs = report.get("references", {})
    names = [n for n in ("go", "rust", "socat") if n in refs]
    head = ["measure", "direct", "switcher", *names, "switcher/Go"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ratio_row(label: str, key: str, direct: str) -> None:
        ours = report[key]["ratio"]
        cells = [label, direct, f"{ours:.2f}"]
        cells += [f"{refs[n][key]['ratio']:.2f}" for n in names]
        cells.append(f"**{ours / refs['go'][key]['ratio']:.2f}**" if "go" in refs else "")
        lines.append("| " + " | ".join(cells) + " |")

    a = report["a_new_connection"]
    ratio_row(
        "new connection per request",
        "a_new_connection",
        f"1.00 (p50 {a['direct_latency']['p50_ms'] * 1000:.0f} µs)",
    )
    ratio_row("one connection, many identity requests", "b_identities_one_connection", "1.00")
    ratio_row("signing", "c_sign_one_connection", "1.00")
    crowded = [report["d_crowded_over_clean"]["ratio"]]
    cells = ["crowded agents dir vs switcher's clean", "", f"{crowded[0]:.2f}"]
    for n in names:
        figure = refs[n].get("d_crowded_over_switcher_clean")
        cells.append(f"{figure['ratio']:.2f}" if figure else "")
    go_crowded = refs.get("go", {}).get("d_crowded_over_switcher_clean")
    cells.append(f"**{crowded[0] / go_crowded['ratio']:.2f}**" if go_crowded else "")
    lines.append("| " + " | ".join(cells) + " |")
    for workload in ("new_connection", "one_connection"):
        large = report["h_large_answer"][workload]

        def added(figure: dict[str, Any] | None) -> str:
            if figure is None:
                return ""
            return "wedges" if "wedged" in figure else f"+{figure['added_ms']:.3f} ms"

        cells = [
            f"{report['h_large_answer']['answer_bytes'] // 1000} KB answer, p50 over direct, "
            + workload.replace("_", " "),
            f"p50 {large['direct_p50_ms']:.3f} ms",
            added(large["proxied"]),
        ]
        cells += [added(large.get(n)) for n in names]
        cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    mem = report["e_memory"]
    go_mem = refs.get("go", {}).get("e_memory")
    lines.append(
        f"| idle RSS | | {mem['idle_rss_mb']} MB | "
        + " | ".join(f"{go_mem['idle_rss_mb']} MB" if n == "go" and go_mem else "" for n in names)
        + " | |"
    )
    lines.append(
        f"| {IDLE_CONNECTIONS} idle connections | | +{mem['added_mb']} MB | "
        + " | ".join(f"+{go_mem['added_mb']} MB" if n == "go" and go_mem else "" for n in names)
        + " | |"
    )
    first = report["g_first_use"]
    lines.append(
        f"| new session to first use | | median {first['median_s']} s, max {first['max_s']} s |"
        + " |" * len(names)
        + " |"
    )
    for name, figure in report["f_startup"].get("commands", {}).items():
        if name != "python -c pass":
            lines.append(
                f"| `{name}` | | {figure['ratio']:.2f}x `python3 -c pass` |"
                + " |" * len(names)
                + " |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="client processes for (a) and (d)")
    parser.add_argument("--quick", action="store_true", help="fewer requests per round")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    parser.add_argument("--table", action="store_true", help="also print a Markdown table")
    parser.add_argument(
        "--peers",
        metavar="DIR",
        help=f"where the prior art's builds are (default ${peers.PEERS_ENV} "
        f"or {peers.DEFAULT_PEERS_DIR}); skipped when absent",
    )
    args = parser.parse_args()
    report = measure(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(json.dumps({k: v for k, v in report.items() if k != "f_startup"}, indent=2))
    print(json.dumps({"f_startup": report["f_startup"]}, indent=2))
    for name, figure, verdict in verdicts(report):
        print(f"{name:28} {figure:75} {verdict}")
    if args.table:
        print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
