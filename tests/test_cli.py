"""The command line, run for real in subprocesses: flags, exit codes, signals, logs."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fakes import AgentClient
from procs import ALLOW_ROOT, Daemon, accepts, run_cli, start_daemon, terminate
from switcher.core import MessageType, encode


@pytest.fixture
async def daemon(short_tmp: Path) -> AsyncIterator[Daemon]:
    with trio.fail_after(20):
        running = await start_daemon(short_tmp)
    try:
        yield running
    finally:
        with trio.CancelScope(shield=True):
            await terminate(running)


class TestPath:
    def test_prints_the_default_socket_path(self) -> None:
        """`switcher path` prints /tmp/switcher-$UID/agent.sock, for SSH_AUTH_SOCK."""
        result = run_cli("path")
        assert (result.returncode, result.stdout) == (
            0,
            f"/tmp/switcher-{os.getuid()}/agent.sock\n",
        )


class TestSignals:
    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
    async def test_stop_signals_exit_cleanly_and_remove_the_socket(
        self, daemon: Daemon, signum: int
    ) -> None:
        """SIGTERM, SIGINT and SIGQUIT stop the daemon with status 0 and remove its socket."""
        with trio.fail_after(20):
            assert await daemon.stop(signum) == 0
        assert not daemon.socket_path.exists()
        events = [e["event"] for e in daemon.log_events()]
        assert events[-1] == "switcher.daemon.stopped"
        assert events.index("switcher.daemon.stopping") < events.index("switcher.daemon.stopped")

    async def test_sighup_never_stops_it(self, daemon: Daemon) -> None:
        """After SIGHUP the daemon still answers, and logs that it got the signal."""
        with trio.fail_after(20):
            daemon.process.send_signal(signal.SIGHUP)
            while "switcher.daemon.sighup" not in [e["event"] for e in daemon.log_events()]:
                await trio.sleep(0.02)
            client = AgentClient(await trio.open_unix_socket(str(daemon.socket_path)))
            async with client.stream:
                reply = await client.request(MessageType.REQUEST_IDENTITIES)
            assert daemon.process.poll() is None
            assert await daemon.stop() == 0
        assert reply == encode(MessageType.FAILURE)

    async def test_open_connection_gets_its_reply_during_shutdown(self, daemon: Daemon) -> None:
        """A client connected when SIGTERM arrives is still answered within the grace."""
        with trio.fail_after(20):
            client = AgentClient(await trio.open_unix_socket(str(daemon.socket_path)))
            async with client.stream:
                daemon.process.send_signal(signal.SIGTERM)
                while "switcher.daemon.stopping" not in [e["event"] for e in daemon.log_events()]:
                    await trio.sleep(0.02)
                assert not accepts(daemon.socket_path)  # it stopped accepting first
                reply = await client.request(MessageType.REQUEST_IDENTITIES)
            assert await daemon.process.wait() == 0
        assert reply == encode(MessageType.FAILURE)


class TestStartupRefusals:
    async def test_second_instance_exits_3(self, daemon: Daemon) -> None:
        """A second daemon on the same socket path says so and exits 3; the first keeps serving."""
        result = run_cli(
            "daemon", *ALLOW_ROOT, "--socket-path", str(daemon.socket_path), "--agents-dirs", "/x"
        )
        assert (result.returncode, result.stderr) == (
            3,
            f"switcher: another switcher is already running for {daemon.socket_path}\n",
        )
        assert accepts(daemon.socket_path)

    async def test_a_stale_socket_is_replaced(self, short_tmp: Path) -> None:
        """A socket nobody answers on (a crashed daemon's) is replaced, not refused."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(short_tmp / "s.sock"))
        assert not accepts(short_tmp / "s.sock")
        with trio.fail_after(20):
            running = await start_daemon(short_tmp)  # returns once it serves
            assert await running.stop() == 0

    def test_refuses_a_regular_file_at_the_socket_path(self, short_tmp: Path) -> None:
        """A file that is not a socket is never deleted; the daemon exits 1 with the reason."""
        path = short_tmp / "s.sock"
        path.write_text("precious")
        result = run_cli("daemon", *ALLOW_ROOT, "--socket-path", str(path), "--agents-dirs", "/x")
        assert (result.returncode, result.stderr) == (
            1,
            f"switcher: {path} exists and is not a socket; refusing to replace it\n",
        )
        assert path.read_text() == "precious"

    def test_refuses_a_world_writable_directory(self, short_tmp: Path) -> None:
        """A socket directory others can write to (and not sticky) is refused with exit 1."""
        shared = short_tmp / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        result = run_cli(
            "daemon", *ALLOW_ROOT, "--socket-path", str(shared / "s.sock"), "--agents-dirs", "/x"
        )
        assert result.returncode == 1
        assert "writable by group or others and not sticky" in result.stderr
        assert list(shared.iterdir()) == []

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--probe-interval", "0"], "must be between 0 and 86400 seconds"),
            (["--probe-interval", "soon"], "not a number of seconds"),
            (["--agents-dirs", "relative/dir"], "directories must be absolute"),
            (["--log-level", "loud"], "invalid choice"),
        ],
    )
    def test_bad_flags_exit_2(self, args: list[str], message: str) -> None:
        """Bad flags get argparse's usage error and exit status 2."""
        result = run_cli("daemon", *ALLOW_ROOT, *args)
        assert result.returncode == 2
        assert message in result.stderr

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as root")
    def test_refuses_root_without_allow_root(self, short_tmp: Path) -> None:
        """As root and without --allow-root, the daemon explains and exits 1, creating nothing."""
        result = run_cli(
            "daemon", "--socket-path", str(short_tmp / "s.sock"), "--agents-dirs", "/x"
        )
        assert result.returncode == 1
        assert result.stderr.startswith("switcher: refusing to run as root: ")
        assert list(short_tmp.iterdir()) == []


class TestLogs:
    async def test_log_file_holds_json_lines(self, daemon: Daemon) -> None:
        """Every line of --log-file is a JSON object with an event, a level and a timestamp."""
        with trio.fail_after(20):
            client = AgentClient(await trio.open_unix_socket(str(daemon.socket_path)))
            async with client.stream:
                await client.request(MessageType.REQUEST_IDENTITIES)
            assert await daemon.stop() == 0
        events = daemon.log_events()
        assert all({"event", "level", "timestamp"} <= e.keys() for e in events)
        closed = [
            e
            for e in events
            if e["event"] == "switcher.proxy.connection_closed" and e["outcome"] != "closed_idle"
        ]
        assert [
            (e["outcome"], e["answered_locally"], e["client_pid"] is not None) for e in closed
        ] == [("no_backend", 1, True)]
