"""The relay socket alone: the relay with RelaySocket against the relay with trio's SocketStream.

    python benchmarks/relaysocket.py [--rounds 7] [--requests 20000]

One process runs switcher's relay (``relay_connection``, as the daemon does,
without the daemon around it) in front of a real ssh-agent; a client
process sends REQUEST_IDENTITIES over one connection, in lockstep. Rounds
alternate (A B A B ...) between the relay's two socket types, on both the
client and the agent side: ``RelaySocket`` (what the daemon uses) and
trio's ``SocketStream`` (what it would use otherwise). Everything else is
the same code. Prints requests per second, medians over the rounds, and
their ratio (RelaySocket over SocketStream: above 1.0 is what it buys).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import structlog
import trio

from switcher.core import (
    Backend,
    Candidate,
    Health,
    Layout,
    ProbeResult,
    Registry,
    RelaySocket,
    RelayStream,
    open_backend,
    relay_connection,
)

HERE = Path(__file__).resolve().parent

# The client: lockstep identity requests over one connection, timed.
_CLIENT = """
import sys, time
sys.path.insert(0, sys.argv[1])
import agentbench as ab
sock = ab.connect(sys.argv[2])
request = ab.frame(ab.REQUEST_IDENTITIES)
count = int(sys.argv[3])
for _ in range(200):
    ab.roundtrip(sock, request)
started = time.perf_counter()
for _ in range(count):
    ab.roundtrip(sock, request)
print(count / (time.perf_counter() - started))
"""


async def _relay_round(proxy_path: str, agent_path: str, requests: int, *, fast: bool) -> float:
    registry = Registry()
    registry.reconcile([Candidate(agent_path, Layout.TMP, 1, 1, 1.0)])
    backend = registry.snapshot().backends[0]
    registry.record_probe(backend.id, ProbeResult(Health.HEALTHY, latency=0.001, key_count=1))

    async def connect(backend: Backend) -> RelayStream:
        if fast:
            return await open_backend(backend.path, refuse_pid=None)
        return await trio.open_unix_socket(backend.path)

    async def rescan() -> None:
        pass

    listening = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listening.bind(proxy_path)
    listening.listen(4)
    listener = trio.SocketListener(listening)
    async with listener, trio.open_nursery() as nursery:

        async def serve_one() -> None:
            stream = await listener.accept()
            client: RelayStream = RelaySocket.from_trio(stream) if fast else stream
            await relay_connection(client, registry=registry, connect=connect, rescan=rescan)

        nursery.start_soon(serve_one)
        result = await trio.run_process(
            [sys.executable, "-c", _CLIENT, str(HERE), proxy_path, str(requests)],
            capture_stdout=True,
        )
        nursery.cancel_scope.cancel()
    await trio.Path(proxy_path).unlink()
    return float(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # One event per connection only, but none of it belongs in the figure.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    with tempfile.TemporaryDirectory(prefix="sw-bench-", dir="/tmp") as tmp:
        agent_path = str(Path(tmp) / "agent.sock")
        agent = subprocess.Popen(["ssh-agent", "-D", "-a", agent_path], stdout=subprocess.DEVNULL)
        try:
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{tmp}/key"], check=True
            )
            subprocess.run(
                ["ssh-add", "-q", f"{tmp}/key"],
                env={"SSH_AUTH_SOCK": agent_path},
                check=True,
                stderr=subprocess.DEVNULL,
            )
            figures: dict[str, list[float]] = {"relaysocket": [], "socketstream": []}
            for _ in range(args.rounds):
                for name, fast in (("relaysocket", True), ("socketstream", False)):
                    rate = trio.run(
                        lambda fast=fast: _relay_round(
                            f"{tmp}/proxy.sock", agent_path, args.requests, fast=fast
                        )
                    )
                    figures[name].append(rate)
        finally:
            agent.terminate()
            agent.wait()
    fast, slow = (statistics.median(figures[k]) for k in ("relaysocket", "socketstream"))
    report = {
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "relaysocket_per_s": round(fast),
        "socketstream_per_s": round(slow),
        "ratio": round(fast / slow, 2),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
