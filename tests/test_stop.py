"""``switcher stop``, the real command: against a real daemon; failures against a fake one."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fakes import AgentClient, FakeAgent
from procs import (
    ALLOW_ROOT,
    SWITCHER,
    Daemon,
    notify_socket,
    start_daemon,
    terminate,
    wait_ready,
)
from switcher import _defaults
from switcher.cli import _stop
from switcher.core import MessageType

# Every wait in these tests gives up after this long.
HANG_GUARD_S = 30


async def switcher(*args: str) -> tuple[int, str, str]:
    """Run ``switcher ARGS``; return its status, stdout and stderr."""
    result = await trio.run_process(
        [*SWITCHER, *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@pytest.fixture
async def daemons() -> AsyncIterator[list[Daemon]]:
    """Daemons a test started, stopped for good however the test ends."""
    started: list[Daemon] = []
    try:
        yield started
    finally:
        with trio.CancelScope(shield=True):
            for daemon in started:
                await terminate(daemon)
                daemon.notify.close()


def events(daemon: Daemon) -> list[str]:
    return [str(event["event"]) for event in daemon.log_events()]


class TestStop:
    async def test_stops_the_daemon_as_sigterm_does(
        self, short_tmp: Path, daemons: list[Daemon]
    ) -> None:
        """stop returns once the daemon has exited 0 with both sockets gone, after the same
        drain as SIGTERM: a connection open when it began is still served meanwhile."""
        agent = FakeAgent("one")
        results: list[tuple[int, str, str]] = []
        returned = trio.Event()
        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                session = short_tmp / "agents" / "ssh-0000000001"
                session.mkdir(parents=True, mode=0o700)
                await nursery.start(agent.serve_unix, str(session / "agent.1"))
                daemon = await start_daemon(short_tmp, agents=[short_tmp / "agents"])
                daemons.append(daemon)
                client = AgentClient(await trio.open_unix_socket(str(daemon.socket_path)))
                async with client.stream:
                    assert await client.request(MessageType.REQUEST_IDENTITIES)

                    async def stop() -> None:
                        results.append(
                            await switcher("stop", "--control-path", str(daemon.control_path))
                        )
                        returned.set()

                    nursery.start_soon(stop)
                    while b"STOPPING=1" not in (await daemon.notify.recv(4096)).split(b"\n"):
                        pass
                    during = await client.request(MessageType.REQUEST_IDENTITIES)
                exit_status = await daemon.process.wait()
                await returned.wait()
                nursery.cancel_scope.cancel()
        assert (during, results, exit_status) == (
            agent.answer(MessageType.REQUEST_IDENTITIES),
            [
                (
                    0,
                    (
                        f"stopped the daemon (pid {daemon.process.pid}) "
                        f"that served {daemon.socket_path}\n"
                    ),
                    "",
                )
            ],
            0,
        )
        assert not os.path.lexists(daemon.socket_path)
        assert not os.path.lexists(daemon.control_path)
        logged = daemon.log_events()
        stopping = next(e for e in logged if e["event"] == "switcher.daemon.stopping")
        requested = next(e for e in logged if e["event"] == "switcher.control.stop_requested")
        assert (stopping["reason"], requested["client_uid"]) == ("stop_requested", os.getuid())
        assert [e for e in events(daemon) if e.endswith(("stop_requested", "stopped"))] == [
            "switcher.control.stop_requested",
            "switcher.daemon.stopped",
        ]

    async def test_a_second_stop_while_draining_stops_it_once(
        self, short_tmp: Path, daemons: list[Daemon]
    ) -> None:
        """A stop that arrives while the daemon already drains for another is not a second
        shutdown: both callers see it exit, and the log says "stopping" once."""
        agent = FakeAgent("one")
        results: list[int] = []

        async def stop(daemon: Daemon) -> None:
            status, _, _ = await switcher("stop", "--control-path", str(daemon.control_path))
            results.append(status)

        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                session = short_tmp / "agents" / "ssh-0000000001"
                session.mkdir(parents=True, mode=0o700)
                await nursery.start(agent.serve_unix, str(session / "agent.1"))
                daemon = await start_daemon(short_tmp, agents=[short_tmp / "agents"])
                daemons.append(daemon)
                client = AgentClient(await trio.open_unix_socket(str(daemon.socket_path)))
                # The open client keeps the daemon draining (for its grace) meanwhile.
                async with trio.open_nursery() as stops, client.stream:
                    assert await client.request(MessageType.REQUEST_IDENTITIES)
                    stops.start_soon(stop, daemon)
                    while b"STOPPING=1" not in (await daemon.notify.recv(4096)).split(b"\n"):
                        pass
                    stops.start_soon(stop, daemon)
                    await daemon.process.wait()
                nursery.cancel_scope.cancel()
        assert (results, events(daemon).count("switcher.daemon.stopping")) == ([0, 0], 1)

    async def test_finds_the_daemon_from_its_socket_path(
        self, short_tmp: Path, daemons: list[Daemon]
    ) -> None:
        """With --socket-path alone, ctl and stop reach the daemon that chose its own control
        socket from that path (no --control-path on either side)."""
        socket_path = short_tmp / "s.sock"
        control_path = Path(_defaults.control_path_for(str(socket_path)))
        with trio.fail_after(HANG_GUARD_S):
            notify = notify_socket(short_tmp / "n.sock")
            process = await trio.lowlevel.open_process(
                [
                    *(*SWITCHER, "daemon", *ALLOW_ROOT),
                    *("--socket-path", str(socket_path)),
                    *("--agents-dirs", str(short_tmp / "none")),
                    *("--log-file", str(short_tmp / "daemon.log")),
                ],
                env={**os.environ, "NOTIFY_SOCKET": str(short_tmp / "n.sock")},
            )
            daemon = Daemon(process, socket_path, control_path, short_tmp / "daemon.log", notify)
            daemons.append(daemon)
            await wait_ready(process, notify)
            ctl_status, ctl_out, _ = await switcher(
                "ctl", "--socket-path", str(socket_path), "status", "--json"
            )
            stop_status, _, stop_err = await switcher("stop", "--socket-path", str(socket_path))
            exit_status = await process.wait()
        assert (ctl_status, json.loads(ctl_out)["socket_path"]) == (0, str(socket_path))
        assert (stop_status, stop_err, exit_status) == (0, "", 0)
        assert not os.path.lexists(control_path)

    async def test_no_daemon_exits_3(self, short_tmp: Path) -> None:
        """Nothing listens at the control path: exit 3, and nothing to stop."""
        path = short_tmp / "c.sock"
        with trio.fail_after(HANG_GUARD_S):
            result = await switcher("stop", "--control-path", str(path))
        assert result == (3, "", f"switcher: no daemon at {path}: nothing to stop\n")


async def fake_daemon(path: Path, reply: dict[str, object], nursery: trio.Nursery) -> None:
    """A control socket at ``path`` that answers any request with ``reply`` and stays open."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(json.dumps(reply).encode() + b"\n")
            await trio.sleep_forever()

    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(4)
    await nursery.start(trio.serve_listeners, handle, [trio.SocketListener(sock)])


class TestStopFails:
    async def test_a_daemon_that_does_not_exit_in_time_exits_1(
        self, short_tmp: Path, nursery: trio.Nursery
    ) -> None:
        """A daemon that says it is stopping but does not exit within --timeout: exit 1, why."""
        path = short_tmp / "c.sock"
        alive = os.getpid()  # this test's own process: it will not exit meanwhile
        stopping = {"ok": True, "stopping": True, "pid": alive, "socket_path": "/x/s.sock"}
        await fake_daemon(path, stopping, nursery)
        with trio.fail_after(HANG_GUARD_S):
            result = await switcher("stop", "--control-path", str(path), "--timeout", "0.2")
        assert result == (1, "", f"switcher: the daemon (pid {alive}) did not stop within 0.2 s\n")

    async def test_a_daemon_that_leaves_its_socket_exits_1(
        self, short_tmp: Path, nursery: trio.Nursery
    ) -> None:
        """A daemon that exits but leaves its agent socket behind has not stopped cleanly."""
        path = short_tmp / "c.sock"
        left = short_tmp / "s.sock"
        left.touch()
        gone = await trio.lowlevel.open_process(["true"])
        await gone.wait()  # a process that has exited
        reply = {"ok": True, "stopping": True, "pid": gone.pid, "socket_path": str(left)}
        await fake_daemon(path, reply, nursery)
        with trio.fail_after(HANG_GUARD_S):
            result = await switcher("stop", "--control-path", str(path))
        assert result == (
            1,
            "",
            (
                f"switcher: the daemon (pid {gone.pid}) has exited, "
                f"but its socket {left} is still there\n"
            ),
        )

    async def test_a_daemon_that_refuses_exits_1_with_its_reason(
        self, short_tmp: Path, nursery: trio.Nursery
    ) -> None:
        """A daemon too old to know `stop` says so, and that is what the user reads: exit 1."""
        path = short_tmp / "c.sock"
        refusal = {
            "ok": False,
            "error": {"code": "unknown_command", "message": 'unknown command "stop"'},
        }
        await fake_daemon(path, refusal, nursery)
        with trio.fail_after(HANG_GUARD_S):
            result = await switcher("stop", "--control-path", str(path))
        assert result == (1, "", 'switcher: unknown command "stop"\n')

    async def test_a_reply_without_a_pid_exits_1(
        self, short_tmp: Path, nursery: trio.Nursery
    ) -> None:
        """A reply that does not say which process to wait for is an error, not a traceback."""
        path = short_tmp / "c.sock"
        await fake_daemon(path, {"ok": True, "stopping": True}, nursery)
        with trio.fail_after(HANG_GUARD_S):
            result = await switcher("stop", "--control-path", str(path))
        assert result == (
            1,
            "",
            "switcher: the daemon's reply to stop does not have the expected shape\n",
        )


def no_pidfds(_pid: int) -> int:
    raise OSError(errno.ENOSYS, "Function not implemented")


class TestWaitingForTheExit:
    """Without pidfds (old kernels), stop watches /proc instead."""

    def test_a_reaped_process_has_exited(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A process that is gone from /proc has exited."""
        monkeypatch.setattr(os, "pidfd_open", no_pidfds)
        child = subprocess.Popen(["true"])
        child.wait()
        assert _stop._wait_exited(child.pid, time.monotonic()) is True

    def test_a_zombie_has_exited(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A process that has exited but is not yet reaped by its parent has exited too."""
        monkeypatch.setattr(os, "pidfd_open", no_pidfds)
        child = subprocess.Popen(["true"])
        try:
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, still a zombie
            assert _stop._wait_exited(child.pid, time.monotonic()) is True
        finally:
            child.wait()

    def test_a_live_process_past_the_deadline_has_not(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A process still running when the deadline has passed: not exited."""
        monkeypatch.setattr(os, "pidfd_open", no_pidfds)
        assert _stop._wait_exited(os.getpid(), time.monotonic()) is False
