"""A standard-library SSH agent client for benchmarks: frames, timing, worker processes.

Kept free of switcher's own code so that the client costs the same whether
it talks to ssh-agent directly or through switcher.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import struct
import time

REQUEST_IDENTITIES = 11
IDENTITIES_ANSWER = 12
SIGN_REQUEST = 13
SIGN_RESPONSE = 14

_U32 = struct.Struct(">I")


def frame(message_type: int, body: bytes = b"") -> bytes:
    return _U32.pack(len(body) + 1) + bytes((message_type,)) + body


def string(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def recv_exact(sock: socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = sock.recv(count)
        if not chunk:
            raise EOFError("agent closed the connection")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def roundtrip(sock: socket.socket, request: bytes) -> bytes:
    """Send one request frame; return the reply frame's type byte and body."""
    sock.sendall(request)
    (length,) = _U32.unpack(recv_exact(sock, 4))
    return recv_exact(sock, length)


def connect(path: str, timeout: float | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def first_key_blob(path: str) -> bytes:
    """The public key blob of the agent's first identity (to build SIGN_REQUESTs)."""
    with connect(path) as sock:
        reply = roundtrip(sock, frame(REQUEST_IDENTITIES))
    if reply[0] != IDENTITIES_ANSWER or _U32.unpack_from(reply, 1)[0] < 1:
        raise RuntimeError("the agent holds no key")
    (blob_len,) = _U32.unpack_from(reply, 5)
    return reply[9 : 9 + blob_len]


def sign_request(blob: bytes, data: bytes = b"switcher benchmark payload " * 4) -> bytes:
    return frame(SIGN_REQUEST, string(blob) + string(data) + _U32.pack(0))


def identities_request() -> bytes:
    return frame(REQUEST_IDENTITIES)


# -- workloads: each returns per-request latencies in seconds -------------------


def new_connection_each(
    path: str, request: bytes, count: int, timeout: float | None = None
) -> list[float]:
    """What `ssh` and `ssh-add` do: connect, one request, close."""
    latencies = []
    expected = None
    for _ in range(count):
        started = time.perf_counter()
        with connect(path, timeout) as sock:
            reply = roundtrip(sock, request)
        latencies.append(time.perf_counter() - started)
        expected = expected or reply[0]
        if reply[0] != expected:
            raise RuntimeError(f"reply type changed: {reply[0]} after {expected}")
    return latencies


def one_connection(
    path: str, request: bytes, count: int, timeout: float | None = None
) -> list[float]:
    """Many requests on one connection, one at a time (``TimeoutError`` if a reply stalls)."""
    latencies = []
    with connect(path, timeout) as sock:
        for _ in range(count):
            started = time.perf_counter()
            reply = roundtrip(sock, request)
            latencies.append(time.perf_counter() - started)
            if reply[0] not in (IDENTITIES_ANSWER, SIGN_RESPONSE):
                raise RuntimeError(f"unexpected reply type {reply[0]}")
    return latencies


_WORKLOADS = {"new": new_connection_each, "one": one_connection}


def _worker(args: tuple[str, str, bytes, int]) -> list[float]:
    workload, path, request, count = args
    return _WORKLOADS[workload](path, request, count)


def run_parallel(
    pool: multiprocessing.pool.Pool,
    workload: str,
    path: str,
    request: bytes,
    count: int,
    workers: int,
) -> tuple[float, list[float]]:
    """Run ``workers`` clients at once; return (requests per second, all latencies)."""
    started = time.perf_counter()
    results = pool.map(_worker, [(workload, path, request, count)] * workers)
    elapsed = time.perf_counter() - started
    latencies = [x for r in results for x in r]
    return len(latencies) / elapsed, latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
