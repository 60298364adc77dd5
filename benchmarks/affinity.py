"""What session affinity costs per connection: two agents, affinity on against off.

    python benchmarks/affinity.py [--rounds 7] [--connections 1000] [--json]

Two real ssh-agents, each holding a key, are presented as two forwarded
sessions (``DIR/agents/ssh-*/agent.N``) to two switcher daemons that differ
only in ``--affinity``. A client makes a new connection per
REQUEST_IDENTITIES (what ``ssh`` and ``ssh-add`` do), from two places:

- outside tmux: a process whose environment names session A's socket, so
  affinity finds its session in the first process it reads;
- inside tmux: a pane of a real tmux server, with one client attached (on
  a pty from ``script``) that was started from session B: affinity reads
  the pane's ancestry, asks tmux (cached for a quarter second), and reads
  the tmux client's ancestry;
- nowhere: outside tmux and any session (a local terminal, a cron job,
  the other benchmarks' clients): no ancestor names a session's socket, so
  affinity reads the whole ancestry and the ranking decides;
- fresh: the same place, but each connection from a new process (a fork
  of the client, as each ``ssh`` and ``ssh-add`` is one): no decision is
  remembered for it, only what is known of its ancestors.

Rounds interleave the runs; figures are medians over rounds of the
per-connection p50, and the added cost is on minus off, per place.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
STARTUP_BOUND = 30.0

# Runs one client loop and prints its latencies as JSON: used both directly and
# inside the tmux pane.
_CLIENT = """
import json, sys
sys.path.insert(0, {here!r})
import agentbench as ab
latencies = ab.new_connection_each({socket!r}, ab.identities_request(), {count})
with open({out!r} + ".part", "w") as f:
    json.dump(latencies, f)
import os
os.rename({out!r} + ".part", {out!r})
"""

# The same, but each connection from a new process: a fork that connects once
# and hands its latency back through a pipe.
_FORKING_CLIENT = """
import json, os, struct, sys
sys.path.insert(0, {here!r})
import agentbench as ab
request = ab.identities_request()
latencies = []
for _ in range({count}):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        [latency] = ab.new_connection_each({socket!r}, request, 1)
        os.write(write_end, struct.pack("d", latency))
        os._exit(0)
    os.close(write_end)
    data = os.read(read_end, 8)
    os.close(read_end)
    os.waitpid(pid, 0)
    latencies.append(struct.unpack("d", data)[0])
with open({out!r} + ".part", "w") as f:
    json.dump(latencies, f)
os.rename({out!r} + ".part", {out!r})
"""

PLACES = ("outside", "tmux", "nowhere", "fresh")


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + STARTUP_BOUND
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def agent(directory: Path, name: str, number: int) -> Iterator[Path]:
    """An ssh-agent with one fresh key, at DIR/agents/ssh-NAME/agent.NUMBER."""
    session = directory / "agents" / f"ssh-{name * 10}"
    session.mkdir(parents=True, mode=0o700)
    socket = session / f"agent.{number}"
    key = directory / f"key-{name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL)
    try:
        wait_for(socket.exists, f"ssh-agent at {socket}")
        env = {**os.environ, "SSH_AUTH_SOCK": str(socket)}
        subprocess.run(["ssh-add", "-q", str(key)], check=True, env=env)
        yield socket
    finally:
        process.terminate()
        process.wait()


@contextmanager
def daemon(directory: Path, name: str, affinity: str) -> Iterator[Path]:
    socket = directory / f"{name}.sock"
    argv = [
        sys.executable,
        "-m",
        "switcher",
        "daemon",
        "--allow-root",
        "--socket-path",
        str(socket),
        "--agents-dirs",
        str(directory / "agents"),
        "--log-file",
        str(directory / f"{name}.log"),
        "--affinity",
        affinity,
    ]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: socket.exists() and both_healthy(socket), f"daemon {name}")
        yield socket
    finally:
        process.terminate()
        process.wait()


def both_healthy(socket: Path) -> bool:
    listed = subprocess.run(
        [sys.executable, "-m", "switcher", "ctl", "--socket-path", str(socket), "list", "--json"],
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:
        return False
    backends = json.loads(listed.stdout)["backends"]
    return len(backends) == 2 and all(b["health"] == "healthy" for b in backends)


@contextmanager
def tmux(directory: Path, session_a: Path, session_b: Path) -> Iterator[Path]:
    """A tmux server started from session A, with one client attached from session B."""
    socket = directory / "tmux.sock"
    base = ["tmux", "-S", str(socket), "-f", "/dev/null"]
    env_a = {**os.environ, "SSH_AUTH_SOCK": str(session_a)}
    env_a.pop("TMUX", None)
    new = [*base, "new-session", "-d", "-s", "bench", "-x", "80", "-y", "24"]
    subprocess.run(new, env=env_a, check=True)
    env_b = {**env_a, "SSH_AUTH_SOCK": str(session_b), "TERM": "xterm"}
    attach = shlex.join([*base, "attach-session", "-t", "bench"])
    client = subprocess.Popen(
        ["script", "-qfc", attach, "/dev/null"],
        env=env_b,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )

    def attached() -> bool:
        listed = subprocess.run([*base, "list-clients"], capture_output=True, check=False)
        return bool(listed.stdout.strip())

    try:
        wait_for(attached, "the tmux client")
        yield socket
    finally:
        subprocess.run([*base, "kill-server"], check=False)
        client.kill()
        client.wait()


def run_client(
    directory: Path, socket: Path, count: int, *, env: dict[str, str], forking: bool = False
) -> list[float]:
    out = directory / "out.json"
    code = (_FORKING_CLIENT if forking else _CLIENT).format(
        here=str(HERE), socket=str(socket), count=count, out=str(out)
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    latencies: list[float] = json.loads(out.read_text())
    out.unlink()
    return latencies


def run_in_pane(directory: Path, tmux_socket: Path, socket: Path, count: int) -> list[float]:
    out = directory / "out.json"
    code = _CLIENT.format(here=str(HERE), socket=str(socket), count=count, out=str(out))
    command = shlex.join([sys.executable, "-c", code])
    subprocess.run(
        ["tmux", "-S", str(tmux_socket), "new-window", "-d", "-t", "bench", command], check=True
    )
    wait_for(out.exists, "the pane's client")
    latencies: list[float] = json.loads(out.read_text())
    out.unlink()
    return latencies


def chosen_by(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "switcher.proxy.connection_closed":
            key = str(event.get("chosen_by"))
            counts[key] = counts.get(key, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--places", default=",".join(PLACES), help=f"which clients, of {', '.join(PLACES)}"
    )
    args = parser.parse_args()
    places = [place for place in PLACES if place in args.places.split(",")]
    for tool in ("ssh-agent", "ssh-add", "ssh-keygen", "tmux", "script"):
        if shutil.which(tool) is None:
            sys.exit(f"benchmarks/affinity.py needs {tool}")
    directory = Path(tempfile.mkdtemp(prefix="swaff-", dir="/tmp"))
    runs: dict[str, list[float]] = {}
    try:
        with ExitStack() as stack:
            a = stack.enter_context(agent(directory, "a", 1001))
            b = stack.enter_context(agent(directory, "b", 1002))
            sockets = {
                "on": stack.enter_context(daemon(directory, "on", "on")),
                "off": stack.enter_context(daemon(directory, "off", "off")),
            }
            tmux_socket = stack.enter_context(tmux(directory, a, b))
            outside_env = {**os.environ, "SSH_AUTH_SOCK": str(a)}
            outside_env.pop("TMUX", None)
            # What a client of switcher outside any session has: its socket.
            nowhere_env = {**outside_env, "SSH_AUTH_SOCK": str(sockets["off"])}
            for _ in range(2):  # warm-up: caches, imports, the daemons' first connections
                for socket in sockets.values():
                    run_client(directory, socket, 50, env=outside_env)
            n = args.connections
            for _ in range(args.rounds):
                for setting, socket in sockets.items():
                    clients = {
                        "outside": partial(run_client, directory, socket, n, env=outside_env),
                        "tmux": partial(run_in_pane, directory, tmux_socket, socket, n),
                        "nowhere": partial(run_client, directory, socket, n, env=nowhere_env),
                        "fresh": partial(
                            run_client, directory, socket, n, env=nowhere_env, forking=True
                        ),
                    }
                    for place in places:
                        latencies = clients[place]()
                        runs.setdefault(f"{place}/{setting}", []).append(
                            statistics.median(latencies)
                        )
            chosen = {name: chosen_by(directory / f"{name}.log") for name in sockets}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    p50 = {name: statistics.median(values) * 1e3 for name, values in runs.items()}
    report = {
        "rounds": args.rounds,
        "connections": args.connections,
        "p50_ms": {name: round(value, 3) for name, value in p50.items()},
        "added_ms": {place: round(p50[f"{place}/on"] - p50[f"{place}/off"], 3) for place in places},
        # How the daemons chose, counted from their logs: proof that "on" did the lookups.
        "chosen_by": chosen,
        "per_round_p50_ms": {
            name: [round(v * 1e3, 3) for v in values] for name, values in runs.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, value in sorted(p50.items()):
        print(f"{name:12} p50 {value:.3f} ms")
    print(f"chosen_by: {chosen}")
    wheres = {
        "outside": "outside tmux",
        "tmux": "inside tmux",
        "nowhere": "outside tmux and any session",
        "fresh": "outside tmux and any session, a new process each",
    }
    for place in places:
        where = wheres[place]
        on, off = p50[f"{place}/on"], p50[f"{place}/off"]
        print(f"affinity adds {on - off:+.3f} ms ({on / off - 1:+.0%}) per connection {where}")


if __name__ == "__main__":
    main()
