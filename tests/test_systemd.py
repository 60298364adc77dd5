"""systemd: socket activation and sd_notify, spoken by hand, and the units in contrib/systemd."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fakes import AgentClient
from procs import ALLOW_ROOT, SWITCHER, accepts, control_request, log_events, wait_ready
from switcher import _systemd
from switcher.core import MessageType, encode

# Every subprocess and wait here gives up after this long.
HANG_GUARD_S = 20
FAILURE = encode(MessageType.FAILURE)
UNITS = Path(__file__).parent.parent / "contrib" / "systemd"

# What systemd does between fork and exec: put the listening sockets at
# descriptors 3, 4, ... and say so in LISTEN_FDS, LISTEN_PID (the pid that
# will exec the daemon) and LISTEN_FDNAMES; then exec. Arguments: the
# inherited descriptors ("7,8"), the names ("agent:control", or "-" for
# none), then the daemon's argv.
ACTIVATE = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
names, argv = sys.argv[2], sys.argv[3:]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for number, fd in enumerate(moved, start=3):
    os.dup2(fd, number)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()))
if names != "-":
    os.environ["LISTEN_FDNAMES"] = names
os.execv(argv[0], argv)
"""


def listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


@pytest.fixture
async def notify_socket(short_tmp: Path) -> AsyncIterator[trio.socket.SocketType]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(short_tmp / "notify"))
    with sock:
        yield sock


@pytest.fixture
async def processes() -> AsyncIterator[list[trio.Process]]:
    """Processes a test started; killed and reaped when it ends, however it ends."""
    started: list[trio.Process] = []
    try:
        yield started
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(HANG_GUARD_S):
            for process in started:
                if process.returncode is None:
                    process.kill()
                await process.wait()


async def activate(
    root: Path,
    sockets: list[socket.socket],
    names: str,
    *daemon_args: str,
    notify: Path | None,
    processes: list[trio.Process],
) -> trio.Process:
    """Run `switcher daemon DAEMON_ARGS` with ``sockets`` passed as systemd passes them."""
    env = dict(os.environ)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    fds = [s.fileno() for s in sockets]
    process = await trio.lowlevel.open_process(
        [
            *(sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), names),
            *(*SWITCHER, "daemon", *ALLOW_ROOT, "--agents-dirs", str(root / "none")),
            *("--log-file", str(root / "daemon.log"), *daemon_args),
        ],
        pass_fds=fds,
        env=env,
    )
    processes.append(process)
    return process


class TestActivation:
    @pytest.mark.parametrize("names", ["agent:control", "-"], ids=["named", "by-path"])
    async def test_serves_the_passed_sockets_and_notifies(
        self,
        short_tmp: Path,
        notify_socket: trio.socket.SocketType,
        processes: list[trio.Process],
        names: str,
    ) -> None:
        """Given both sockets (by name, or unnamed at the configured paths), the daemon serves
        them, reports READY=1 then STOPPING=1, and leaves them in place when it stops."""
        agent_path, control_path = short_tmp / "s.sock", short_tmp / "c.sock"
        with listening(agent_path) as agent, listening(control_path) as control:
            with trio.fail_after(HANG_GUARD_S):
                process = await activate(
                    short_tmp,
                    [agent, control],
                    names,
                    *("--socket-path", str(agent_path), "--control-path", str(control_path)),
                    notify=short_tmp / "notify",
                    processes=processes,
                )
                ready = (await notify_socket.recv(4096)).decode()
                client = AgentClient(await trio.open_unix_socket(str(agent_path)))
                async with client.stream:
                    reply = await client.request(MessageType.REQUEST_IDENTITIES)
                status = await control_request(control_path, {"v": 1, "cmd": "status"})
                process.send_signal(signal.SIGTERM)
                stopping = (await notify_socket.recv(4096)).decode()
                assert await process.wait() == 0
        assert (ready, reply, status["pid"]) == (
            f"READY=1\nSTATUS=serving {agent_path}",
            FAILURE,
            process.pid,
        )
        assert stopping == "STOPPING=1\nSTATUS=stopping"
        # systemd's sockets stay where systemd put them, and they were never locked.
        assert sorted(p.name for p in short_tmp.iterdir()) == [
            "c.sock",
            "daemon.log",
            "notify",
            "s.sock",
        ]
        started = next(
            e
            for e in log_events(short_tmp / "daemon.log")
            if e["event"] == "switcher.daemon.started"
        )
        assert started["activated"] == [str(agent_path), str(control_path)]

    async def test_an_activated_agent_socket_alone(
        self,
        short_tmp: Path,
        notify_socket: trio.socket.SocketType,
        processes: list[trio.Process],
    ) -> None:
        """Given only the agent socket (what contrib/systemd/switcher.socket passes), the
        daemon serves it and binds the control socket itself."""
        agent_path, control_path = short_tmp / "s.sock", short_tmp / "c.sock"
        with listening(agent_path) as agent:
            with trio.fail_after(HANG_GUARD_S):
                process = await activate(
                    short_tmp,
                    [agent],
                    "agent",
                    *("--socket-path", str(short_tmp / "elsewhere.sock")),
                    *("--control-path", str(control_path)),
                    notify=short_tmp / "notify",
                    processes=processes,
                )
                await wait_ready(process, notify_socket)
                status = await control_request(control_path, {"v": 1, "cmd": "status"})
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
        # The activated socket's path wins over --socket-path; the control socket was ours.
        assert (status["socket_path"], agent_path.exists(), control_path.exists()) == (
            str(agent_path),
            True,
            False,
        )

    @pytest.mark.parametrize(
        ("names", "message"),
        [
            (
                "bogus",
                (
                    "systemd passed a socket this daemon has no use for: bogus at {path} "
                    "(name one agent and one control)"
                ),
            ),
            ("agent:control", "LISTEN_FDNAMES names 2 descriptors but LISTEN_FDS says 1"),
        ],
    )
    async def test_unusable_activation_is_refused(
        self, short_tmp: Path, processes: list[trio.Process], names: str, message: str
    ) -> None:
        """A socket the daemon has no role for, or names that do not match the descriptors,
        make it exit 1 with the reason."""
        path = short_tmp / "other.sock"
        with listening(path) as sock:
            with trio.fail_after(HANG_GUARD_S):
                process = await trio.lowlevel.open_process(
                    [
                        *(sys.executable, "-c", ACTIVATE, str(sock.fileno()), names),
                        *(*SWITCHER, "daemon", *ALLOW_ROOT),
                        *("--socket-path", str(short_tmp / "s.sock")),
                        *("--control-path", str(short_tmp / "c.sock")),
                    ],
                    pass_fds=[sock.fileno()],
                    stderr=subprocess.PIPE,
                )
                processes.append(process)
                assert await process.wait() == 1
                assert process.stderr is not None
                stderr = await process.stderr.receive_some(4096)
        assert stderr.decode() == f"switcher: {message.format(path=path)}\n"
        assert sorted(p.name for p in short_tmp.iterdir()) == ["other.sock"]

    @pytest.mark.skipif(
        shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
    )
    async def test_under_systemd_socket_activate(
        self,
        short_tmp: Path,
        notify_socket: trio.socket.SocketType,
        processes: list[trio.Process],
    ) -> None:
        """systemd's own test tool starts the daemon on the first connection, which the
        daemon then answers."""
        agent_path, control_path = short_tmp / "s.sock", short_tmp / "c.sock"
        with trio.fail_after(HANG_GUARD_S):
            process = await trio.lowlevel.open_process(
                [
                    "systemd-socket-activate",
                    *("-l", str(agent_path), "-l", str(control_path), "--fdname=agent:control"),
                    *("-E", f"NOTIFY_SOCKET={short_tmp / 'notify'}"),
                    *(*SWITCHER, "daemon", *ALLOW_ROOT, "--agents-dirs", str(short_tmp / "none")),
                ],
                stderr=subprocess.DEVNULL,
            )
            processes.append(process)
            while not accepts(agent_path):  # systemd-socket-activate is listening ...
                assert process.poll() is None
                await trio.sleep(0.02)
            client = AgentClient(await trio.open_unix_socket(str(agent_path)))
            async with client.stream:
                # ... and starts the daemon for this connection, which it then serves.
                reply = await client.request(MessageType.REQUEST_IDENTITIES)
            ready = (await notify_socket.recv(4096)).decode()
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        assert (reply, ready) == (FAILURE, f"READY=1\nSTATUS=serving {agent_path}")


class TestListenFds:
    def test_nothing_without_activation(self) -> None:
        """Without LISTEN_* variables there is nothing to take over."""
        assert _systemd.listen_fds({"HOME": "/x"}, pid=42) == []

    def test_variables_for_another_process_are_ignored_and_removed(self) -> None:
        """LISTEN_PID naming another process means the sockets are not ours; the variables
        go either way, so nothing we start inherits them."""
        env = {"LISTEN_PID": "41", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "HOME": "/x"}
        assert (_systemd.listen_fds(env, pid=42), env) == ([], {"HOME": "/x"})

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            (
                {"LISTEN_PID": "me", "LISTEN_FDS": "1"},
                "LISTEN_PID and LISTEN_FDS must be numbers, not 'me' and '1'",
            ),
            ({"LISTEN_PID": "42", "LISTEN_FDS": "-1"}, "LISTEN_FDS must not be negative: -1"),
            (
                {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "agent"},
                "LISTEN_FDNAMES names 1 descriptors but LISTEN_FDS says 2",
            ),
        ],
    )
    def test_malformed_variables_are_refused(self, env: dict[str, str], message: str) -> None:
        """Malformed activation variables are an error with a one-line reason."""
        with pytest.raises(_systemd.ActivationError) as info:
            _systemd.listen_fds(env, pid=42)
        assert str(info.value) == message

    def test_a_listening_unix_socket_is_taken_over(self, short_tmp: Path) -> None:
        """An inherited listening Unix stream socket is adopted with the path it is bound to."""
        with listening(short_tmp / "s.sock") as original:
            path, sock = _systemd.listening_unix_socket("agent", os.dup(original.fileno()))
            with sock:
                assert (path, sock.family, sock.type) == (
                    short_tmp / "s.sock",
                    socket.AF_UNIX,
                    socket.SOCK_STREAM,
                )

    @pytest.mark.parametrize("kind", ["not-listening", "datagram", "pipe"])
    def test_anything_else_is_refused(self, short_tmp: Path, kind: str) -> None:
        """A socket that is not listening, a datagram socket or a pipe is refused."""
        if kind == "pipe":
            fd, other = os.pipe()
            os.close(other)
        else:
            kind_type = socket.SOCK_DGRAM if kind == "datagram" else socket.SOCK_STREAM
            sock = socket.socket(socket.AF_UNIX, kind_type)
            sock.bind(str(short_tmp / "x.sock"))
            fd = sock.detach()
        with pytest.raises(_systemd.ActivationError) as info:
            _systemd.listening_unix_socket("agent", fd)
        expected = (
            f"inherited descriptor {fd} (agent): Socket operation on non-socket"
            if kind == "pipe"
            else f"inherited descriptor {fd} (agent) is not a listening Unix stream socket "
            "with a path"
        )
        assert str(info.value) == expected
        if kind == "pipe":
            os.close(fd)
        else:
            with pytest.raises(OSError, match="Bad file descriptor"):  # closed by the refusal
                os.fstat(fd)


class TestNotify:
    async def test_to_a_path(self, short_tmp: Path, notify_socket: trio.socket.SocketType) -> None:
        """A notification reaches a datagram socket at a path, as one datagram."""
        _systemd.notify(str(short_tmp / "notify"), "READY=1\nSTATUS=up")
        with trio.fail_after(HANG_GUARD_S):
            assert await notify_socket.recv(4096) == b"READY=1\nSTATUS=up"

    async def test_to_the_abstract_namespace(self, short_tmp: Path) -> None:
        """A NOTIFY_SOCKET starting with @ is an abstract socket address."""
        name = f"switcher-test-{os.getpid()}-{short_tmp.name}"
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            await sock.bind("\0" + name)
            _systemd.notify("@" + name, "STOPPING=1")
            with trio.fail_after(HANG_GUARD_S):
                assert await sock.recv(4096) == b"STOPPING=1"

    @pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234"])
    def test_unsupported_addresses_raise_oserror(self, address: str) -> None:
        """Addresses neither absolute nor abstract raise OSError (logged, never fatal)."""
        with pytest.raises(OSError, match="unsupported NOTIFY_SOCKET address"):
            _systemd.notify(address, "READY=1")

    def test_nobody_listening_raises_oserror(self, short_tmp: Path) -> None:
        """With nothing at the address, notify raises OSError instead of blocking."""
        with pytest.raises(FileNotFoundError):
            _systemd.notify(str(short_tmp / "absent"), "READY=1")


class TestUnits:
    def test_socket_unit_listens_privately_at_the_stable_path(self) -> None:
        """switcher.socket listens at /tmp/switcher-$UID/agent.sock, named `agent`, 0600 in
        a 0700 directory."""
        settings = _unit_settings(UNITS / "switcher.socket")
        assert {
            k: settings[k]
            for k in ("ListenStream", "FileDescriptorName", "SocketMode", "DirectoryMode")
        } == {
            "ListenStream": "/tmp/switcher-%U/agent.sock",
            "FileDescriptorName": _systemd.AGENT_FD_NAME,
            "SocketMode": "0600",
            "DirectoryMode": "0700",
        }

    def test_service_unit_is_a_notify_service_running_the_daemon(self) -> None:
        """switcher.service runs `switcher daemon` in the foreground as a Type=notify service."""
        settings = _unit_settings(UNITS / "switcher.service")
        assert (settings["Type"], settings["ExecStart"].split()[1:]) == ("notify", ["daemon"])

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
    def test_units_pass_systemd_analyze_verify(self, short_tmp: Path) -> None:
        """systemd-analyze verify finds nothing wrong with the units (ExecStart pointed at an
        executable that exists here)."""
        for unit in ("switcher.socket", "switcher.service"):
            text = (UNITS / unit).read_text()
            text = text.replace("%h/.local/bin/switcher", shutil.which("true") or "/bin/true")
            (short_tmp / unit).write_text(text)
        result = subprocess.run(
            [
                "systemd-analyze",
                "verify",
                str(short_tmp / "switcher.socket"),
                str(short_tmp / "switcher.service"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def _unit_settings(path: Path) -> dict[str, str]:
    """The Key=Value lines of a unit file (each key appears once in ours)."""
    settings = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


class TestShippedUnits:
    @pytest.mark.skipif(
        shutil.which("systemd-analyze") is None,
        reason="needs systemd-analyze (Debian: systemd) to check unit files",
    )
    def test_units_pass_systemd_analyze_verify(self, short_tmp: Path) -> None:
        """systemd-analyze verify --user accepts the shipped units, ExecStart pointed at
        this switcher as the README's install steps say."""
        script = Path(sys.executable).parent / "switcher"
        if not script.is_file():
            pytest.skip("no switcher script beside this interpreter to point ExecStart at")
        units = short_tmp / "units"
        units.mkdir()
        for name in ("switcher.socket", "switcher.service"):
            text = (UNITS / name).read_text()
            (units / name).write_text(text.replace("%h/.local/bin/switcher", str(script)))
        runtime = short_tmp / "run"
        runtime.mkdir(mode=0o700)
        result = subprocess.run(
            ["systemd-analyze", "verify", "--user", "switcher.socket", "switcher.service"],
            cwd=units,
            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
            check=False,
        )
        assert (result.returncode, result.stderr) == (0, "")
