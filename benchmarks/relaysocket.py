"""The relay socket alone: the relay with RelaySocket against the relay with trio's SocketStream.

    python benchmarks/relaysocket.py [--rounds 7] [--requests 20000]

One process runs switcher's relay (``relay_connection``, as the daemon does,
without the daemon around it) in front of a real ssh-agent; a client
process sends REQUEST_IDENTITIES over one connection, in lockstep. Rounds
alternate (A B A B ...) between the relay's two socket types, on both the
client and the agent side: ``RelaySocket`` (what the daemon uses) and
trio's ``SocketStream`` (what it would use otherwise). Everything else is
the same code. Prints, as medians over the rounds, the client's requests per
second and the relay's own CPU time per request (``time.process_time``
around ``relay_connection``: the client and the agent are other
processes), and their ratios, SocketStream's cost over RelaySocket's: above
1.0 is what RelaySocket buys. CPU per request is the steadier figure on a
shared machine; throughput also moves with everything else running.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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

# Requests each client sends before it starts timing.
_WARMUP = 200

# The client: lockstep identity requests over one connection, timed.
_CLIENT = f"""
import sys, time
sys.path.insert(0, sys.argv[1])
import agentbench as ab
sock = ab.connect(sys.argv[2])
request = ab.frame(ab.REQUEST_IDENTITIES)
count = int(sys.argv[3])
for _ in range({_WARMUP}):
    ab.roundtrip(sock, request)
started = time.perf_counter()
for _ in range(count):
    ab.roundtrip(sock, request)
print(count / (time.perf_counter() - started))
"""


async def _relay_round(
    proxy_path: str, agent_path: str, requests: int, *, fast: bool
) -> tuple[float, float]:
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
            started = time.process_time()
            await relay_connection(client, registry=registry, connect=connect, rescan=rescan)
            cpu.append(time.process_time() - started)

        cpu: list[float] = []

        nursery.start_soon(serve_one)
        result = await trio.run_process(
            [sys.executable, "-c", _CLIENT, str(HERE), proxy_path, str(requests)],
            capture_stdout=True,
        )
        # The client has closed after its last request: the nursery waits
        # for the relay to notice and return.
    await trio.Path(proxy_path).unlink()
    # Requests per second seen by the client, and the relay's CPU per request (µs).
    return float(result.stdout), cpu[0] / (requests + _WARMUP) * 1e6


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
            rates: dict[str, list[float]] = {"relaysocket": [], "socketstream": []}
            cpu: dict[str, list[float]] = {"relaysocket": [], "socketstream": []}
            for _ in range(args.rounds):
                for name, use_relay_socket in (("relaysocket", True), ("socketstream", False)):
                    round_ = functools.partial(
                        _relay_round,
                        f"{tmp}/proxy.sock",
                        agent_path,
                        args.requests,
                        fast=use_relay_socket,
                    )
                    rate, cpu_us = trio.run(round_)
                    rates[name].append(rate)
                    cpu[name].append(cpu_us)
        finally:
            agent.terminate()
            agent.wait()
    report: dict[str, object] = {"rounds": args.rounds, "requests_per_round": args.requests}
    for name in ("relaysocket", "socketstream"):
        report[f"{name}_req_per_s"] = round(statistics.median(rates[name]))
        report[f"{name}_relay_cpu_us_per_req"] = round(statistics.median(cpu[name]), 1)
    report["throughput_ratio"] = round(
        statistics.median(rates["relaysocket"]) / statistics.median(rates["socketstream"]), 2
    )
    report["cpu_ratio"] = round(
        statistics.median(cpu["socketstream"]) / statistics.median(cpu["relaysocket"]), 2
    )
    report["per_round_cpu_ratios"] = [
        round(b / a, 2) for a, b in zip(cpu["relaysocket"], cpu["socketstream"], strict=True)
    ]
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>34}: {value}")


if __name__ == "__main__":
    main()
