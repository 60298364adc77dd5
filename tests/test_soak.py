"""Soak: a real daemon under 50 busy clients while sessions come and go.

Fifty clients send REQUEST_IDENTITIES and SIGN_REQUEST, on fresh
connections and on connections they reuse, to a real daemon subprocess.
Meanwhile forwarded sessions (fake agents on ``DIR/ssh-XXXXXXXXXX/agent.N``
sockets, served from this process) appear and disappear every 100 to
500 ms, at random from a fixed seed. A new session always starts before an
old one stops, so at least one is live at every moment; one in five stops
like a killed sshd, leaving its socket file behind for a while.

Every reply names the session that gave it (the key and the signature are
the session's name), which is how the client tells the cases apart:

* ok: a whole, correct reply, and on a reused connection from the same
  session as before (a conversation never moves to another session);
* closed by backend loss (expected): a reused connection closed without a
  reply after the session that had answered on it stopped. The proxy never
  fails over a conversation that has had replies (OpenSSH binds agent
  connections to sessions), so this is its documented behaviour;
* failed: anything else. On a fresh connection that is SSH_AGENT_FAILURE,
  a close or no reply at all (while a session was live, which is always);
  on a reused one, a wrong or missing reply while its session was live.

The test asserts that nothing failed and that the daemon's descriptors
come back to where they were. It runs for ``SWITCHER_SOAK_SECONDS``
(default 120); ``python benchmarks/soak.py`` runs the same soak standalone
and prints the figures recorded in docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path

import attrs
import trio

from fakes import AgentClient, FakeAgent
from procs import (
    control_request,
    fd_targets,
    needs_root_to_look_inside,
    open_fds,
    rss_kib,
    settled_open_fds,
    start_daemon,
    terminate,
    wait_open_fds_at_most,
)
from switcher.core import MessageType, encode

# Counting the daemon's descriptors is how these tests see leaks.
pytestmark = needs_root_to_look_inside

DEFAULT_SECONDS = 120.0
DEFAULT_CLIENTS = 50
DEFAULT_SEED = 20261127
# Sessions change every this many seconds (uniformly at random in between).
CHURN_S = (0.1, 0.5)
# Share of requests sent on the client's current connection rather than a
# new one, and how many requests a connection carries at most.
REUSE_SHARE = 0.6
MAX_REQUESTS_PER_CONNECTION = 20
# Pause between a client's requests: a little, so fifty clients keep the
# daemon busy without the test process itself becoming the bottleneck.
THINK_S = (0.0, 0.01)
# Share of sessions that end like a killed sshd (socket file left behind),
# and how long such a file stays before "tmp cleaning" removes it.
STALE_SHARE = 0.2
STALE_LIFETIME_S = 2.0
# OpenSSH's listen backlog for agent sockets (SSH_LISTEN_BACKLOG, misc.h).
SSH_LISTEN_BACKLOG = 128
# A reply not in within this long counts as a failure (a hang guard, not a
# performance bound: replies take milliseconds).
REPLY_GUARD_S = 10.0
# How many failures are kept verbatim for the report.
FAILURES_KEPT = 20

SIGN_BODY = b"\x00\x00\x00\x03key\x00\x00\x00\x04data\x00\x00\x00\x00"


def soak_seconds() -> float:
    """The soak's duration: ``SWITCHER_SOAK_SECONDS``, or two minutes."""
    return float(os.environ.get("SWITCHER_SOAK_SECONDS", DEFAULT_SECONDS))


@attrs.define
class Figures:
    """What one soak run measured."""

    seconds: float
    clients: int
    seed: int
    sessions_started: int = 0
    sessions_left_stale: int = 0
    sessions_live_at_end: int = 0
    requests_sent: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    closed_by_backend_loss: int = 0
    on_fresh_connections: int = 0
    on_reused_connections: int = 0
    connections_opened: int = 0
    fds_start: int = 0
    fds_end: int = 0
    rss_start_kib: int = 0
    rss_end_kib: int = 0
    daemon_connections: object = None
    failures: list[str] = attrs.Factory(list)

    def fail(self, what: str) -> None:
        self.requests_failed += 1
        if len(self.failures) < FAILURES_KEPT:
            self.failures.append(what)

    def report(self) -> str:
        lines = [
            f"soak: {self.seconds:g} s, {self.clients} clients, seed {self.seed}",
            (
                f"  sessions: {self.sessions_started} started, "
                f"{self.sessions_started - self.sessions_live_at_end} stopped during the soak "
                f"({self.sessions_left_stale} leaving a stale socket)"
            ),
            (
                f"  requests sent: {self.requests_sent} "
                f"({self.on_fresh_connections} on fresh connections, "
                f"{self.on_reused_connections} on reused ones; "
                f"{self.connections_opened} connections)"
            ),
            f"  requests ok: {self.requests_ok}",
            f"  requests failed: {self.requests_failed}",
            (
                "  reused connections closed by backend loss (expected): "
                f"{self.closed_by_backend_loss}"
            ),
            f"  daemon descriptors: {self.fds_start} at start, {self.fds_end} at end",
            f"  daemon RSS: {self.rss_start_kib} KiB at start, {self.rss_end_kib} KiB at end",
            f"  daemon's own count (ctl status): {self.daemon_connections}",
        ]
        lines += [f"  failure: {f}" for f in self.failures]
        return "\n".join(lines)


def session_of(reply: bytes) -> str | None:
    """The session a reply came from (its one key, or its signature), if it is one of ours."""
    message_type, body = reply[4], reply[5:]
    try:
        if message_type == MessageType.IDENTITIES_ANSWER:
            count, length = struct.unpack_from(">II", body)
            return body[8 : 8 + length].decode() if count == 1 else None
        if message_type == MessageType.SIGN_RESPONSE:
            (length,) = struct.unpack_from(">I", body)
            return body[4 : 4 + length].decode()
    except (struct.error, UnicodeDecodeError):
        return None
    return None


@attrs.define(eq=False)
class Session:
    name: str
    path: Path
    agent: FakeAgent
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    stopped: bool = False


@attrs.define(eq=False)
class Sessions:
    """Forwarded sessions in an agents dir, started and stopped like sshd does."""

    agents_dir: Path
    nursery: trio.Nursery
    rng: random.Random
    figures: Figures
    live: list[Session] = attrs.Factory(list)
    by_name: dict[str, Session] = attrs.Factory(dict)
    _stale: list[tuple[float, Path]] = attrs.Factory(list)
    _newest_ctime: float = 0.0

    async def start(self) -> Session:
        """A new session: an sshd-style directory and socket, listening before we return."""
        number = self.figures.sessions_started + 1
        name = f"session-{number:06d}"
        directory = self.agents_dir / f"ssh-{number:010d}"
        directory.mkdir(mode=0o700)
        session = Session(
            name, directory / f"agent.{number}", FakeAgent(name, keys=[name.encode()])
        )

        async def serve(*, task_status: trio.TaskStatus[None]) -> None:
            # bind() and listen() back to back, as sshd does (misc.c,
            # unix_listener): no moment when the socket exists but refuses.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(session.path))
            sock.listen(SSH_LISTEN_BACKLOG)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            with session.scope:
                async with listener, trio.open_nursery() as connections:
                    task_status.started()
                    while True:
                        connections.start_soon(session.agent.serve, await listener.accept())

        await self.nursery.start(serve)
        await self._make_newest(session.path)
        self.live.append(session)
        self.by_name[name] = session
        self.figures.sessions_started += 1
        return session

    async def _make_newest(self, path: Path) -> None:
        # The daemon prefers the newest socket by ctime, which ticks coarsely:
        # restamp it (chmod) until it is later than every earlier session's.
        # (Metadata calls on a local directory: they never block for long.)
        while path.stat().st_ctime <= self._newest_ctime:
            await trio.sleep(0.001)
            path.chmod(0o755)
        self._newest_ctime = path.stat().st_ctime

    def stop(self, session: Session, *, stale: bool) -> None:
        """End a session: its agent goes; sshd removes the socket, a killed one leaves it."""
        session.stopped = True  # before anything closes: see the module docstring
        session.scope.cancel()
        self.live.remove(session)
        if stale:
            self.figures.sessions_left_stale += 1
            self._stale.append((time.monotonic() + STALE_LIFETIME_S, session.path.parent))
        else:
            session.path.unlink()
            session.path.parent.rmdir()

    def clean_stale(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for due, directory in self._stale:
            if everything or due <= now:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                keep.append((due, directory))
        self._stale = keep

    async def churn(self, until: float) -> None:
        """Every 100 to 500 ms: a new session, then old ones stop (never the newest)."""
        while trio.current_time() < until:
            await trio.sleep(self.rng.uniform(*CHURN_S))
            await self.start()
            target = self.rng.choice([1, 1, 2, 3])
            while len(self.live) > target:
                victim = self.rng.choice(self.live[:-1])
                self.stop(victim, stale=self.rng.random() < STALE_SHARE)
            self.clean_stale()


@attrs.define(eq=False)
class Client:
    """One of the soak's clients: requests on fresh and reused connections, classified."""

    socket_path: Path
    sessions: Sessions
    rng: random.Random
    figures: Figures
    connection: AgentClient | None = None
    session: Session | None = None  # the one that answered on this connection
    used: int = 0

    async def run(self, until: float) -> None:
        try:
            while trio.current_time() < until:
                await self.one_request()
                await trio.sleep(self.rng.uniform(*THINK_S))
        finally:
            await self.close()

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.stream.aclose()
        self.connection, self.session, self.used = None, None, 0

    async def one_request(self) -> None:
        reuse = (
            self.connection is not None
            and self.used < MAX_REQUESTS_PER_CONNECTION
            and self.rng.random() < REUSE_SHARE
        )
        if not reuse:
            await self.close()
            self.connection = AgentClient(await trio.open_unix_socket(str(self.socket_path)))
            self.figures.connections_opened += 1
        assert self.connection is not None
        message_type, body = self.rng.choice(
            [(MessageType.REQUEST_IDENTITIES, b""), (MessageType.SIGN_REQUEST, SIGN_BODY)]
        )
        self.figures.requests_sent += 1
        if reuse:
            self.figures.on_reused_connections += 1
        else:
            self.figures.on_fresh_connections += 1
        self.used += 1
        reply: bytes | None = None
        with trio.move_on_after(REPLY_GUARD_S) as guard:
            try:
                reply = await self.connection.request(message_type, body)
            except (EOFError, trio.BrokenResourceError):
                reply = None  # closed on us
        if guard.cancelled_caught:
            self.figures.fail(f"no reply within {REPLY_GUARD_S:g} s (reused={reuse})")
            await self.close()
            return
        await self.classify(reply, reuse=reuse)

    async def classify(self, reply: bytes | None, *, reuse: bool) -> None:
        previous = self.session
        if reply is None:
            if reuse and previous is not None and previous.stopped:
                self.figures.closed_by_backend_loss += 1
            elif reuse:
                self.figures.fail("reused connection closed while its session was live")
            else:
                self.figures.fail("fresh connection closed without a reply")
            await self.close()
            return
        name = session_of(reply)
        session = self.sessions.by_name.get(name) if name is not None else None
        if session is None:
            kind = "SSH_AGENT_FAILURE" if reply == encode(MessageType.FAILURE) else "a wrong reply"
            self.figures.fail(f"{kind} on a {'reused' if reuse else 'fresh'} connection")
            return
        if reuse and previous is not None and session is not previous:
            self.figures.fail(f"conversation moved from {previous.name} to {session.name}")
            return
        self.session = session
        self.figures.requests_ok += 1


async def run_soak(
    root: Path,
    *,
    seconds: float = DEFAULT_SECONDS,
    clients: int = DEFAULT_CLIENTS,
    seed: int = DEFAULT_SEED,
) -> Figures:
    """Run the soak in ``root`` (a short directory) and return its figures."""
    figures = Figures(seconds=seconds, clients=clients, seed=seed)
    # Seeded generators: a reproducible simulation, not cryptography.
    rng = random.Random(seed)
    agents_dir = root / "agents"
    agents_dir.mkdir()
    (root / "d").mkdir()
    async with trio.open_nursery() as nursery:
        sessions = Sessions(agents_dir, nursery, rng, figures)
        first = await sessions.start()
        daemon = await start_daemon(root / "d", "--probe-interval", "1", agents=[agents_dir])
        try:
            pid = daemon.process.pid
            probe = AgentClient(await trio.open_unix_socket(str(daemon.socket_path)))
            async with probe.stream:
                reply = await probe.request(MessageType.REQUEST_IDENTITIES)
                assert session_of(reply) == first.name, "the daemon did not serve the first session"
            figures.fds_start = await settled_open_fds(pid)
            figures.rss_start_kib = rss_kib(pid)
            until = trio.current_time() + seconds
            async with trio.open_nursery() as load:
                load.start_soon(sessions.churn, until)
                for index in range(clients):
                    own_rng = random.Random(seed * 1000 + index)
                    client = Client(daemon.socket_path, sessions, own_rng, figures)
                    load.start_soon(client.run, until)
            figures.sessions_live_at_end = len(sessions.live)
            # Every client has closed: the daemon's descriptors should come back.
            # The count the wait saw at the baseline is the figure: read again
            # later, it could catch a probe of the newest session in flight.
            figures.fds_end = open_fds(pid)
            with trio.move_on_after(10):
                figures.fds_end = await wait_open_fds_at_most(pid, figures.fds_start)
            if figures.fds_end > figures.fds_start:
                figures.failures.append("descriptors left open:\n" + "\n".join(fd_targets(pid)))
            figures.rss_end_kib = rss_kib(pid)
            status = await control_request(daemon.control_path, {"v": 1, "cmd": "status"})
            figures.daemon_connections = status.get("connections")
        finally:
            with trio.CancelScope(shield=True):
                await terminate(daemon)
                for session in list(sessions.live):
                    sessions.stop(session, stale=False)
                sessions.clean_stale(everything=True)
            nursery.cancel_scope.cancel()
    return figures


async def test_soak(short_tmp: Path) -> None:
    """Under 50 busy clients and constant session churn, no request on a fresh connection
    fails, and the daemon's descriptors come back to where they were."""
    seconds = soak_seconds()
    with trio.fail_after(seconds + 120):
        figures = await run_soak(short_tmp, seconds=seconds)
    print()
    print(figures.report())
    assert figures.requests_sent > 0
    assert (figures.requests_failed, figures.failures) == (0, [])
    assert figures.fds_end <= figures.fds_start


def main() -> None:
    """Run the soak standalone (see benchmarks/soak.py for the options)."""
    parser = argparse.ArgumentParser(description="Soak a real switcher daemon; print figures.")
    parser.add_argument("--seconds", type=float, default=soak_seconds())
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sw-soak-", dir="/tmp"))
    figures = trio.run(
        lambda: run_soak(root, seconds=args.seconds, clients=args.clients, seed=args.seed)
    )
    print(figures.report())
    if figures.requests_failed or figures.failures:
        print(f"kept for inspection: {root} (the daemon's log is d/daemon.log)")
        raise SystemExit(1)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
