"""The fault matrix: a real daemon subprocess against backends and clients that misbehave.

Backends are fake agents served from this test process (so the daemon's
own-pid guard does not apply) or real ``ssh-agent -D -a`` processes. After
every fault the test checks the two things a long-running daemon owes its
user: the next client is served normally, and the daemon's open descriptor
count comes back to what it was after start-up and a first request.
docs/RELIABILITY.md lists each fault with what switcher does about it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
from typing import TYPE_CHECKING

import attrs
import pytest
import trio

from fakes import AgentClient, FakeAgent, OnSign, SignFaultAgent
from procs import (
    Daemon,
    control_request,
    fd_targets,
    needs_root_to_look_inside,
    open_fds,
    settled_open_fds,
    start_daemon,
    terminate,
    wait_logged,
    wait_open_fds_at_most,
)
from switcher.core import MessageType, encode

# Counting the daemon's descriptors is how these tests see leaks.
pytestmark = needs_root_to_look_inside

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from world import World

FAILURE = encode(MessageType.FAILURE)
SIGN_BODY = b"\x00\x00\x00\x03key\x00\x00\x00\x04data\x00\x00\x00\x00"

# Hang guard for one test's steps: generous, since CI shares two cores.
GUARD_S = 30
# How long descriptors may take to come back after a fault. The slowest path
# is the accept loop's back-off after running out of descriptors (1 s).
FDS_RECOVER_S = 10
# The descriptor limit for the exhaustion test: the daemon needs about 16 at
# rest, so a few clients (two descriptors each) use up the rest.
LOW_NOFILE = 48

# A client process that connects, sends the bytes given in hex, says so on
# stdout and waits to be killed (its socket is then closed by the kernel).
_CLIENT_SCRIPT = """
import socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(bytes.fromhex(sys.argv[2]))
print("sent", flush=True)
time.sleep(120)
"""


def _low_nofile() -> None:
    """In the daemon's process, before exec: few descriptors allowed."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_NOFILE, LOW_NOFILE))


def _ran_out(daemon: Daemon) -> bool:
    """Whether the daemon logged running out of descriptors."""
    events = {e["event"] for e in daemon.log_events()}
    return bool(
        events
        & {
            "switcher.proxy.accept_failed",
            "switcher.control.accept_failed",
            "switcher.proxy.no_resources",
        }
    )


@attrs.define(eq=False)
class Rig:
    """Fake sessions (``world``), daemons started by the test, and their baselines."""

    world: World
    daemons: list[Daemon] = attrs.Factory(list)
    baselines: dict[int, int] = attrs.Factory(dict)

    async def daemon(
        self,
        *extra: str,
        preexec_fn: Callable[[], object] | None = None,
        first_request: bool = True,
    ) -> Daemon:
        """Start a daemon on the world's agents dir; by default serve one request and
        take the descriptor baseline."""
        directory = self.world.root / f"d{len(self.daemons)}"
        directory.mkdir()
        daemon = await start_daemon(
            directory,
            "--probe-timeout",
            "0.5",
            *extra,
            agents=[self.world.agents_dir],
            preexec_fn=preexec_fn,
        )
        self.daemons.append(daemon)
        if first_request:
            await ask(daemon)
            self.baselines[daemon.process.pid] = await settled_open_fds(daemon.process.pid)
        return daemon

    async def assert_recovered(self, daemon: Daemon, agent: FakeAgent, path: Path) -> None:
        """The descriptors come back; then, once ``agent`` (at ``path``) is the daemon's
        choice, the next client is served by it, and that leaves nothing open either."""
        assert daemon.process.returncode is None, "the daemon died"
        await self.assert_fds_back(daemon)
        await wait_chosen(daemon, path)
        assert await ask(daemon) == agent.answer(MessageType.REQUEST_IDENTITIES)
        assert await ask(daemon, MessageType.SIGN_REQUEST, SIGN_BODY) == agent.answer(
            MessageType.SIGN_REQUEST
        )
        await self.assert_fds_back(daemon)

    async def assert_fds_back(self, daemon: Daemon) -> None:
        """The daemon's descriptor count comes back to its baseline (within a while)."""
        pid = daemon.process.pid
        baseline = self.baselines[pid]
        with trio.move_on_after(FDS_RECOVER_S):
            await wait_open_fds_at_most(pid, baseline)
            # Back at the baseline once is the proof: a count read again later
            # could catch a probe of a new session in flight.
            return
        count = open_fds(pid)
        assert count <= baseline, (
            f"{count} descriptors open, {baseline} at the baseline:\n" + "\n".join(fd_targets(pid))
        )


@pytest.fixture
async def rig(world: World) -> AsyncIterator[Rig]:
    rig = Rig(world)
    try:
        yield rig
    finally:
        with trio.CancelScope(shield=True):
            for daemon in rig.daemons:
                await terminate(daemon)


async def wait_chosen(daemon: Daemon, path: Path) -> None:
    """Wait until the daemon would send a new connection to the healthy agent at ``path``."""
    while True:
        listing = await control_request(daemon.control_path, {"v": 1, "cmd": "list"})
        backends = listing["backends"]
        assert isinstance(backends, list)
        if any(
            b["id"] == listing["choice"] and b["path"] == str(path) and b["health"] == "healthy"
            for b in backends
        ):
            return
        await trio.sleep(0.05)


async def wait_health(daemon: Daemon, path: Path, health: str) -> None:
    """Wait until the daemon's registry holds the backend at ``path`` with ``health``."""
    while True:
        listing = await control_request(daemon.control_path, {"v": 1, "cmd": "list"})
        backends = listing["backends"]
        assert isinstance(backends, list)
        if any(b["path"] == str(path) and b["health"] == health for b in backends):
            return
        await trio.sleep(0.05)


async def connect(daemon: Daemon) -> AgentClient:
    return AgentClient(await trio.open_unix_socket(str(daemon.socket_path)))


async def ask(
    daemon: Daemon, message_type: int = MessageType.REQUEST_IDENTITIES, body: bytes = b""
) -> bytes:
    """One request on a fresh connection; its reply frame."""
    client = await connect(daemon)
    async with client.stream:
        return await client.request(message_type, body)


async def no_reply_within(client: AgentClient, seconds: float) -> bool:
    """Whether the client gets nothing at all (no byte, no EOF) for ``seconds``."""
    with trio.move_on_after(seconds):
        await client.stream.receive_some(1)
        return False
    return True


def outcomes(daemon: Daemon) -> list[object]:
    return [
        e["outcome"]
        for e in daemon.log_events()
        if e["event"] == "switcher.proxy.connection_closed"
    ]


async def wait_for_outcome(daemon: Daemon, outcome: str) -> None:
    """Wait until the daemon has logged a connection that ended with ``outcome``."""
    await wait_logged(daemon.log_path, lambda _events: outcome in outcomes(daemon))


@attrs.define(eq=False)
class KilledClient:
    """A client in its own process, killed with SIGKILL when the test says so."""

    process: trio.Process

    @classmethod
    async def send(cls, daemon: Daemon, data: bytes) -> KilledClient:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _CLIENT_SCRIPT, str(daemon.socket_path), data.hex()],
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        received = b""
        while not received.endswith(b"\n"):
            chunk = await process.stdout.receive_some(64)
            assert chunk, "the client process exited before sending"
            received += chunk
        assert received == b"sent\n"
        return cls(process)

    async def kill(self) -> None:
        self.process.kill()
        await self.process.wait()
        assert self.process.stdout is not None
        await self.process.stdout.aclose()


class TestBackendFaults:
    async def test_backend_killed_mid_request_fails_over(self, rig: Rig) -> None:
        """A session that dies while a signature is in flight is replaced by the next one,
        unnoticed."""
        good = FakeAgent("good")
        victim = SignFaultAgent("victim", on_sign=OnSign.HANG)
        with trio.fail_after(GUARD_S):
            good_path, _ = await rig.world.start_agent(good)
            _, victim_session = await rig.world.start_agent(victim)  # newest: chosen
            daemon = await rig.daemon()
            client = await connect(daemon)
            async with client.stream:
                await client.stream.send_all(encode(MessageType.SIGN_REQUEST, SIGN_BODY))
                await victim.sign_seen.wait()
                victim_session.cancel()  # the session ends with the request unanswered
                assert await client.read_frame() == good.answer(MessageType.SIGN_REQUEST)
            await rig.assert_recovered(daemon, good, good_path)

    async def test_only_backend_killed_mid_request_fails_promptly(self, rig: Rig) -> None:
        """When the only session dies mid-request, the client gets SSH_AGENT_FAILURE, not a hang."""
        victim = SignFaultAgent("victim", on_sign=OnSign.HANG)
        with trio.fail_after(GUARD_S):
            _, victim_session = await rig.world.start_agent(victim)
            daemon = await rig.daemon()
            client = await connect(daemon)
            async with client.stream:
                await client.stream.send_all(encode(MessageType.SIGN_REQUEST, SIGN_BODY))
                await victim.sign_seen.wait()
                victim_session.cancel()
                assert await client.read_frame() == FAILURE
            successor = FakeAgent("successor")
            successor_path, _ = await rig.world.start_agent(successor)
            await rig.assert_recovered(daemon, successor, successor_path)

    async def test_backend_that_never_answers_holds_only_its_client(self, rig: Rig) -> None:
        """A backend that takes a signature and never answers stalls that client alone,
        and the client's leaving releases both of its descriptors."""
        stuck = SignFaultAgent("stuck", on_sign=OnSign.HANG)
        with trio.fail_after(GUARD_S):
            await rig.world.start_agent(stuck)
            daemon = await rig.daemon()
            client = await connect(daemon)
            async with client.stream:
                await client.stream.send_all(encode(MessageType.SIGN_REQUEST, SIGN_BODY))
                await stuck.sign_seen.wait()
                # No timeout on requests in flight (a touch may take long) ...
                assert await no_reply_within(client, 0.5)
                # ... and other clients are served meanwhile.
                assert await ask(daemon) == stuck.answer(MessageType.REQUEST_IDENTITIES)
            # The stuck client gave up and closed its connection.
            fresh = FakeAgent("fresh")
            fresh_path, _ = await rig.world.start_agent(fresh)  # newest: serves from now on
            await rig.assert_recovered(daemon, fresh, fresh_path)

    @pytest.mark.parametrize("on_sign", [OnSign.GARBAGE, OnSign.TRUNCATE])
    async def test_garbage_or_truncated_reply_fails_over(self, rig: Rig, on_sign: OnSign) -> None:
        """A reply with an impossible length or cut short is never relayed; the next
        session answers instead."""
        good = FakeAgent("good")
        bad = SignFaultAgent("bad", on_sign=on_sign)
        with trio.fail_after(GUARD_S):
            good_path, _ = await rig.world.start_agent(good)
            await rig.world.start_agent(bad)  # newest: chosen
            daemon = await rig.daemon()
            assert await ask(daemon, MessageType.SIGN_REQUEST, SIGN_BODY) == good.answer(
                MessageType.SIGN_REQUEST
            )
            assert bad.sign_seen.is_set()
            await rig.assert_recovered(daemon, good, good_path)

    @pytest.mark.parametrize("on_sign", [OnSign.GARBAGE, OnSign.TRUNCATE])
    async def test_garbage_or_truncated_reply_from_the_only_backend(
        self, rig: Rig, on_sign: OnSign
    ) -> None:
        """With no other session, a garbage or cut-off reply becomes SSH_AGENT_FAILURE."""
        bad = SignFaultAgent("bad", on_sign=on_sign)
        with trio.fail_after(GUARD_S):
            await rig.world.start_agent(bad)
            daemon = await rig.daemon()
            assert await ask(daemon, MessageType.SIGN_REQUEST, SIGN_BODY) == FAILURE
            good = FakeAgent("good")
            good_path, _ = await rig.world.start_agent(good)
            await rig.assert_recovered(daemon, good, good_path)

    async def test_session_probed_before_it_listens_is_served_once_it_does(self, rig: Rig) -> None:
        """A live session once judged dead (probed between its bind() and listen()) is
        tried before a client is told SSH_AGENT_FAILURE, not only at the next probe cycle."""
        agent = FakeAgent("late")
        path = rig.world.session_dir() / "agent.1"
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with trio.fail_after(GUARD_S):
            try:
                await sock.bind(str(path))  # bound, not yet listening: connect() is refused
                daemon = await rig.daemon("--probe-interval", "3600", first_request=False)
                await wait_health(daemon, path, "dead")
                sock.listen(16)
            except BaseException:
                sock.close()
                raise
            listener = trio.SocketListener(sock)

            async def serve_forever() -> None:
                async with listener:
                    while True:
                        rig.world.nursery.start_soon(agent.serve, await listener.accept())

            rig.world.nursery.start_soon(serve_forever)
            assert await ask(daemon) == agent.answer(MessageType.REQUEST_IDENTITIES)


class TestClientFaults:
    async def test_client_killed_after_half_a_request(self, rig: Rig) -> None:
        """A client killed halfway through sending a request ends only its own connection."""
        agent = FakeAgent("agent")
        with trio.fail_after(GUARD_S):
            agent_path, _ = await rig.world.start_agent(agent)
            daemon = await rig.daemon()
            frame = encode(MessageType.SIGN_REQUEST, SIGN_BODY)
            client = await KilledClient.send(daemon, frame[: len(frame) // 2])
            await client.kill()
            await wait_for_outcome(daemon, "client_vanished_mid_request")
            await rig.assert_recovered(daemon, agent, agent_path)

    @pytest.mark.parametrize("answered", [True, False], ids=["answered-later", "never-answered"])
    async def test_client_killed_with_a_request_in_flight(self, rig: Rig, answered: bool) -> None:
        """A client killed while its signature is at the agent frees its descriptors, whether
        the agent answers later or never."""
        agent = SignFaultAgent("agent", on_sign=OnSign.HOLD if answered else OnSign.HANG)
        with trio.fail_after(GUARD_S):
            await rig.world.start_agent(agent)
            daemon = await rig.daemon()
            client = await KilledClient.send(daemon, encode(MessageType.SIGN_REQUEST, SIGN_BODY))
            await agent.sign_seen.wait()
            await client.kill()
            agent.release.set()  # a held signature is answered now, to nobody
            fresh = FakeAgent("fresh")
            fresh_path, _ = await rig.world.start_agent(fresh)
            await rig.assert_recovered(daemon, fresh, fresh_path)

    @pytest.mark.parametrize(
        "data",
        [
            b"\x00\x00\x00\x00",
            struct.pack(">I", 256 * 1024 + 1) + b"\x0b",
            b"\xff\xff\xff\xff",
            struct.pack(">I", 300 * 1024) + b"\x0d" + b"x" * (300 * 1024 - 1),
        ],
        ids=["zero-length", "just-over-256KiB", "4GiB", "300KiB-sent-whole"],
    )
    async def test_zero_length_and_oversized_frames(self, rig: Rig, data: bytes) -> None:
        """A frame of length zero or over 256 KiB closes that connection without a reply."""
        agent = FakeAgent("agent")
        with trio.fail_after(GUARD_S):
            agent_path, _ = await rig.world.start_agent(agent)
            daemon = await rig.daemon()
            client = await connect(daemon)
            async with client.stream:
                try:
                    await client.stream.send_all(data)
                    assert await client.stream.receive_some(65536) == b""
                except trio.BrokenResourceError:
                    pass  # closed while we were still sending: as good as EOF
            await rig.assert_recovered(daemon, agent, agent_path)
        assert agent.requests.count(MessageType.SIGN_REQUEST) == 1  # only assert_recovered's


class TestResourceFaults:
    async def test_descriptor_exhaustion(self, rig: Rig) -> None:
        """With its descriptors used up by open clients the daemon stays up, and once they
        close the next client is served."""
        agent = FakeAgent("agent")
        with trio.fail_after(GUARD_S * 2):
            agent_path, _ = await rig.world.start_agent(agent)
            daemon = await rig.daemon(preexec_fn=_low_nofile)
            clients: list[AgentClient] = []
            replies: list[bytes | None] = []

            async def hold_one() -> None:
                client = await connect(daemon)  # queued in the backlog if not accepted
                clients.append(client)
                with trio.move_on_after(3):
                    replies.append(await client.request(MessageType.REQUEST_IDENTITIES))
                    return
                replies.append(None)

            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(LOW_NOFILE * 3):
                        nursery.start_soon(hold_one)
            finally:
                for client in clients:
                    await client.stream.aclose()
            # Pressure, or nothing was tested: it ran out, or it left clients waiting.
            assert _ran_out(daemon) or None in replies
            served = agent.answer(MessageType.REQUEST_IDENTITIES)
            assert {r for r in replies if r is not None} <= {served, FAILURE}
            await rig.assert_recovered(daemon, agent, agent_path)

    async def test_accepted_clients_are_served_when_descriptors_run_short(self, rig: Rig) -> None:
        """A client the daemon accepted while descriptors ran short is answered by the agent,
        not refused: the daemon leaves itself the descriptor each relay needs upstream."""
        agent = FakeAgent("agent")
        with trio.fail_after(GUARD_S * 2):
            agent_path, _ = await rig.world.start_agent(agent)
            daemon = await rig.daemon(preexec_fn=_low_nofile)
            # Everyone connects first (as a burst of ssh and git processes
            # does), so the daemon accepts all it can before any request.
            clients = [await connect(daemon) for _ in range(LOW_NOFILE * 3)]
            replies: list[bytes] = []
            try:
                await trio.sleep(0.5)

                async def ask_on(client: AgentClient) -> None:
                    with trio.move_on_after(2):
                        replies.append(await client.request(MessageType.REQUEST_IDENTITIES))

                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(ask_on, client)
            finally:
                for client in clients:
                    await client.stream.aclose()
            # Pressure, or nothing was tested: it ran out, or it left clients waiting.
            assert _ran_out(daemon) or len(replies) < len(clients)
            served = agent.answer(MessageType.REQUEST_IDENTITIES)
            assert replies
            assert {r == served for r in replies} == {True}, (
                f"{replies.count(FAILURE)} of {len(replies)} accepted clients got "
                "SSH_AGENT_FAILURE although the agent was alive"
            )
            await rig.assert_recovered(daemon, agent, agent_path)

    async def test_agents_dir_replaced_by_a_file(self, rig: Rig) -> None:
        """An agents dir that turns into a file is reported and no longer served from; once
        it is a directory again, its sessions are."""
        agent = FakeAgent("agent")
        agents_dir = rig.world.agents_dir
        moved = agents_dir.with_name("agents.moved")
        with trio.fail_after(GUARD_S):
            agent_path, _ = await rig.world.start_agent(agent)
            daemon = await rig.daemon()
            agents_dir.rename(moved)
            agents_dir.write_text("not a directory any more")
            # A miss rescans at once, so the very next request sees the file.
            assert await ask(daemon) == FAILURE
            events = [e["event"] for e in daemon.log_events()]
            assert "switcher.discovery.dir_unreadable" in events
            agents_dir.unlink()
            moved.rename(agents_dir)
            await rig.assert_recovered(daemon, agent, agent_path)

    async def test_agents_dir_vanishes_and_comes_back(self, rig: Rig) -> None:
        """An agents dir that is removed and made again is watched throughout, and the
        session that appears in it is served."""
        gone = FakeAgent("gone")
        agents_dir = rig.world.agents_dir
        with trio.fail_after(GUARD_S):
            _, gone_session = await rig.world.start_agent(gone)
            daemon = await rig.daemon()
            gone_session.cancel()
            shutil.rmtree(agents_dir)
            assert await ask(daemon) == FAILURE
            agents_dir.mkdir(mode=0o700)
            back = FakeAgent("back")
            back_path, _ = await rig.world.start_agent(back)
            await rig.assert_recovered(daemon, back, back_path)

    async def test_log_file_on_a_full_disk(self, rig: Rig) -> None:
        """With every log write failing (ENOSPC), clients are served and SIGTERM exits 0."""
        agent = FakeAgent("agent")
        with trio.fail_after(GUARD_S):
            agent_path, _ = await rig.world.start_agent(agent)
            daemon = await rig.daemon("--log-file", "/dev/full")
            for _ in range(20):
                assert await ask(daemon) == agent.answer(MessageType.REQUEST_IDENTITIES)
            await rig.assert_recovered(daemon, agent, agent_path)
            assert await terminate(daemon) == 0

    async def test_log_directory_removed_while_running(self, rig: Rig) -> None:
        """Removing the log file's directory (and a SIGHUP after it) disturbs nothing."""
        agent = FakeAgent("agent")
        logs = rig.world.root / "logs"
        logs.mkdir()
        with trio.fail_after(GUARD_S):
            agent_path, _ = await rig.world.start_agent(agent)
            daemon = await rig.daemon("--log-file", str(logs / "daemon.log"))
            shutil.rmtree(logs)
            assert await ask(daemon) == agent.answer(MessageType.REQUEST_IDENTITIES)
            daemon.process.send_signal(signal.SIGHUP)
            await rig.assert_recovered(daemon, agent, agent_path)
            assert await terminate(daemon) == 0


# -- a real ssh-agent killed with a signature in flight --------------------------

_needs_openssh = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("ssh-agent", "ssh-add", "ssh-keygen")),
    reason="needs OpenSSH's ssh-agent, ssh-add and ssh-keygen (Debian: openssh-client)",
)


def _ssh_add(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DISPLAY", "SSH_ASKPASS"}}
    env["SSH_AUTH_SOCK"] = str(sock)
    return subprocess.run(
        ["ssh-add", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@attrs.define(eq=False)
class RealAgents:
    """``ssh-agent -D -a`` processes, each in its own process group (killed whole)."""

    processes: list[subprocess.Popen[bytes]] = attrs.Factory(list)

    def start(self, path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        path.parent.mkdir(mode=0o700, parents=True)
        process = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.processes.append(process)
        for _ in range(1000):
            if _ssh_add(path, "-l").returncode in (0, 1):
                return process
            if process.poll() is not None:
                raise AssertionError(f"ssh-agent exited with {process.returncode}")
        raise AssertionError("ssh-agent never accepted")

    def kill_all(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture
def real_agents() -> Iterator[RealAgents]:
    agents = RealAgents()
    try:
        yield agents
    finally:
        agents.kill_all()


@attrs.frozen
class ConfirmingPair:
    """Two real agents holding one key; the newer asks for confirmation, forever."""

    key: Path
    asked: Path  # appears when the newer agent's askpass runs
    confirming: subprocess.Popen[bytes]


def start_confirming_pair(agents: RealAgents, agents_dir: Path, tmp: Path) -> ConfirmingPair:
    key = tmp / "id"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60
    )
    # The newer agent asks for confirmation through an askpass that tells us it
    # was called and then waits forever: a signature in flight, for real.
    asked = tmp / "asked"
    askpass = tmp / "askpass"
    askpass.write_text(f"#!/bin/sh\ntouch {asked}\nexec sleep 600\n")
    askpass.chmod(0o700)
    confirming_env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
    older = agents_dir / "ssh-real000001" / "agent.1"
    newer = agents_dir / "ssh-real000002" / "agent.2"
    agents.start(older)
    assert _ssh_add(older, str(key)).returncode == 0
    confirming = agents.start(newer, env=confirming_env)
    assert _ssh_add(newer, "-c", str(key)).returncode == 0
    os.utime(newer)  # restamped: surely the newest session
    return ConfirmingPair(key, asked, confirming)


@_needs_openssh
async def test_real_ssh_agent_killed_mid_signature(
    rig: Rig, real_agents: RealAgents, short_tmp: Path
) -> None:
    """A real ssh-agent SIGKILLed while it waits to confirm a signature is replaced by the
    next agent, which signs in its place."""
    pair = await trio.to_thread.run_sync(
        start_confirming_pair, real_agents, rig.world.agents_dir, short_tmp
    )
    blob = base64.b64decode(pair.key.with_suffix(".pub").read_text().split()[1])
    request = struct.pack(">I", len(blob)) + blob + struct.pack(">I", 4) + b"data" + bytes(4)
    with trio.fail_after(GUARD_S):
        daemon = await rig.daemon()
        client = await connect(daemon)
        async with client.stream:
            await client.stream.send_all(encode(MessageType.SIGN_REQUEST, request))
            # Polling: only the askpass's file says the agent is waiting.
            while not pair.asked.exists():
                await trio.sleep(0.02)
            os.killpg(pair.confirming.pid, signal.SIGKILL)  # the agent and its askpass
            reply = await client.read_frame()
        assert reply[4] == MessageType.SIGN_RESPONSE
        listed = await trio.to_thread.run_sync(_ssh_add, daemon.socket_path, "-l")
        assert listed.returncode == 0
        await rig.assert_fds_back(daemon)
