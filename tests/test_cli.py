"""The command line, run for real in subprocesses: flags, exit codes, signals, logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fakes import AgentClient
from procs import (
    ALLOW_ROOT,
    SWITCHER,
    Daemon,
    accepts,
    logged,
    run_cli,
    start_daemon,
    terminate,
    wait_logged,
)
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
            await wait_logged(daemon.log_path, logged("switcher.daemon.sighup"))
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
                # Polling, not wait_logged: the listener closes a moment after the log
                # line, and the slower look is what lets this assert it closed first.
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


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    """Read ``stream`` until ``marker`` has come (or the stream ends); all that was read."""
    data = b""
    while marker not in data:
        try:
            chunk = await stream.receive_some(4096)
        except (trio.BrokenResourceError, OSError):  # a pty's EIO once the writer has gone
            break
        if not chunk:
            break
        data += chunk
    return data


async def run_with_stderr_on(
    short_tmp: Path, stderr: int, stream: trio.abc.ReceiveStream, *flags: str
) -> tuple[bytes, int]:
    """Run the daemon (no --log-file) with stderr on ``stderr``; stop it once it has said it
    stopped; what it wrote (read from ``stream``) and its status."""
    process = await trio.lowlevel.open_process(
        [
            *SWITCHER,
            "daemon",
            *ALLOW_ROOT,
            *("--socket-path", str(short_tmp / "s.sock")),
            *("--control-path", str(short_tmp / "c.sock")),
            *("--agents-dirs", str(short_tmp)),
            *flags,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        output = await read_until(stream, b"switcher.daemon.started")
        process.send_signal(signal.SIGTERM)
        output += await read_until(stream, b"switcher.daemon.stopped")
        return output, await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class TestOutputForPeople:
    async def test_a_terminal_gets_console_lines_and_a_start_up_line(self, short_tmp: Path) -> None:
        """With stderr a terminal and no --log-file, events are rendered for people (no JSON)
        and one line says where the daemon serves and how many agents it found."""
        controller, terminal = os.openpty()
        try:
            with trio.fail_after(20):
                reader = trio.lowlevel.FdStream(os.dup(controller))
                async with reader:
                    output, status = await run_with_stderr_on(short_tmp, terminal, reader)
        finally:
            os.close(controller)
            os.close(terminal)
        lines = output.decode().splitlines()
        started = (
            f"switcher: serving {short_tmp / 's.sock'} (control: {short_tmp / 'c.sock'}); "
            f"0 agents found in {short_tmp}; "
            f'use it with: export SSH_AUTH_SOCK="{short_tmp / "s.sock"}"'
        )
        assert (status, started in lines, [ln for ln in lines if ln.startswith("{")]) == (
            0,
            True,
            [],
        )
        assert any("switcher.daemon.stopped" in ln for ln in lines)

    async def test_log_format_json_wins_on_a_terminal(self, short_tmp: Path) -> None:
        """--log-format json gives JSON lines even on a terminal, and no start-up line."""
        controller, terminal = os.openpty()
        try:
            with trio.fail_after(20):
                reader = trio.lowlevel.FdStream(os.dup(controller))
                async with reader:
                    output, status = await run_with_stderr_on(
                        short_tmp, terminal, reader, "--log-format", "json"
                    )
        finally:
            os.close(controller)
            os.close(terminal)
        events = [json.loads(line)["event"] for line in output.decode().splitlines()]
        assert (status, events[0], events[-1]) == (
            0,
            "switcher.daemon.started",
            "switcher.daemon.stopped",
        )

    async def test_a_pipe_gets_json_lines(self, short_tmp: Path) -> None:
        """stderr on a pipe (a service manager, a redirect) gets JSON lines, as a file does."""
        read_fd, write_fd = os.pipe()
        try:
            with trio.fail_after(20):
                reader = trio.lowlevel.FdStream(read_fd)
                async with reader:
                    output, status = await run_with_stderr_on(short_tmp, write_fd, reader)
        finally:
            os.close(write_fd)
        events = [json.loads(line)["event"] for line in output.decode().splitlines()]
        assert (status, events[0], events[-1]) == (
            0,
            "switcher.daemon.started",
            "switcher.daemon.stopped",
        )

    @pytest.mark.parametrize(
        ("args", "usage"),
        [
            (["--bogus"], "usage: switcher [-h]"),
            (["daemon", "--bogus"], "usage: switcher daemon [-h]"),
            (["init", "--bogus"], "usage: switcher init [-h]"),
            (["path", "--bogus"], "usage: switcher path [-h]"),
            (["ctl", "--bogus"], "usage: switcher ctl [-h]"),
            (["ctl", "list", "--bogus"], "usage: switcher ctl list [-h]"),
        ],
    )
    def test_an_unknown_flag_is_named_with_its_commands_usage(
        self, args: list[str], usage: str
    ) -> None:
        """An unknown flag is named, under the usage of the command it was given to."""
        result = run_cli(*args)
        assert (
            result.returncode,
            result.stderr.startswith(usage),
            result.stderr.endswith("error: unrecognized arguments: --bogus\n"),
        ) == (2, True, True)
