"""``switcher ctl`` run for real in subprocesses, against a fake control server.

The fake speaks docs/control-protocol.md from canned replies, so these tests
pin down the client alone: the requests it sends, what it prints, its exit
statuses.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio

from fakes import make_socket_file
from procs import SWITCHER, run_cli
from switcher import __version__, _defaults, paths
from switcher.cli import _control_client, _render, main
from switcher.cli._control_client import Daemon

if TYPE_CHECKING:
    from pathlib import Path

# Every test that runs the client waits at most this long for it.
HANG_GUARD_S = 20
# The client must flush its own output; PYTHONUNBUFFERED in the test runner's
# environment would hide a missing flush.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

Script = Callable[[trio.SocketStream], Awaitable[None]]


def line(value: object) -> bytes:
    return json.dumps(value).encode() + b"\n"


class LineReader:
    """Whole lines from a trio stream (a socket or a child's stdout)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def line(self) -> bytes | None:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some()
            if not data:
                return None
            self.buffer += data
        end = self.buffer.index(b"\n") + 1
        text = bytes(self.buffer[:end])
        del self.buffer[:end]
        return text


@attrs.define(eq=False)
class FakeControl:
    """A control server that answers each command with a canned line.

    ``replies`` maps a command to the raw bytes sent back (None: close without
    replying; bytes without a final newline: close after them); ``scripts``
    maps a command to a function that takes over the connection instead;
    ``requests`` records every request received, parsed.
    """

    path: Path
    replies: dict[str, bytes | None] = attrs.Factory(dict)
    scripts: dict[str, Script] = attrs.Factory(dict)
    requests: list[Any] = attrs.Factory(list)

    async def serve(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        sock.listen(8)
        await trio.serve_listeners(
            self.handle, [trio.SocketListener(sock)], task_status=task_status
        )

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            reader = LineReader(stream)
            while (request_line := await reader.line()) is not None:
                request = json.loads(request_line)
                self.requests.append(request)
                script = self.scripts.get(request["cmd"])
                if script is not None:
                    await script(stream)
                    return
                reply = self.replies.get(request["cmd"])
                if reply is None:
                    return
                await stream.send_all(reply)
                if not reply.endswith(b"\n"):
                    return  # a truncated reply: hang up after it


@pytest.fixture
async def control(short_tmp: Path, nursery: trio.Nursery) -> FakeControl:
    server = FakeControl(short_tmp / "c.sock")
    await nursery.start(server.serve)
    return server


@contextlib.asynccontextmanager
async def running(*args: str, **options: Any) -> AsyncIterator[trio.Process]:
    """``switcher ARGS`` as a child process, killed on the way out if still running."""
    process = await trio.lowlevel.open_process([*SWITCHER, *args], env=CHILD_ENV, **options)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def ctl(path: Path, *args: str) -> tuple[int, str, str]:
    """Run ``switcher ctl --control-path PATH ARGS``; return its status, stdout and stderr."""
    with trio.fail_after(HANG_GUARD_S):
        result = await trio.run_process(
            [*SWITCHER, "ctl", "--control-path", str(path), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=CHILD_ENV,
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def backends(now: float) -> list[dict[str, Any]]:
    """Three backends in rank order: pinned and healthy, slow, never probed."""
    return [
        {
            "id": "6aa7bfd3",
            "path": "/tmp/ssh-AbCd/agent.4242",
            "kind": "forwarded",
            "layout": "tmp",
            "health": "healthy",
            "reason": "pinned",
            "appeared": now - 190,
            "last_probe": now - 1,
            "probe_latency_ms": 0.7,
            "last_success": now - 1,
            "last_error": None,
            "keys": 2,
            "served": 14,
            "failed": 0,
            "pinned": True,
        },
        {
            "id": "9f8e7d6c",
            "path": "/tmp/ssh-QqQq/agent.77",
            "kind": "forwarded",
            "layout": "tmp",
            "health": "slow",
            "reason": "slow",
            "appeared": now - 3 * 3600 - 100,
            "last_probe": now - 2,
            "probe_latency_ms": 2150.4,
            "last_success": now - 2,
            "last_error": None,
            "keys": 11,
            "served": 120,
            "failed": 1,
            "pinned": False,
        },
        {
            "id": "0c1d2e3f",
            "path": "/home/me/.ssh/agent/s.x.sshd.y",
            "layout": "agent-dir",
            "health": "unknown",
            "reason": "unknown: not probed yet",
            "appeared": now - 2 * 86400 - 5,
            "last_probe": None,
            "probe_latency_ms": None,
            "last_success": None,
            "last_error": None,
            "keys": None,
            "served": 0,
            "failed": 3,
            "pinned": False,
        },
    ]


def list_reply() -> dict[str, Any]:
    return {
        "ok": True,
        "choice": "6aa7bfd3",
        "pinned": "6aa7bfd3",
        "backends": backends(time.time()),
    }


STATUS_REPLY: dict[str, Any] = {
    "ok": True,
    "pid": 4242,
    "version": __version__,
    "uptime_s": 3725.2,
    "socket_path": "/tmp/switcher-1000/agent.sock",
    "control_path": "/tmp/switcher-1000/control.sock",
    "agents_dirs": ["/home/me/.ssh/agent", "/tmp"],
    "backends": 2,
    "healthy": 1,
    "pinned": None,
    "choice": "6aa7bfd3",
    "connections": {"total": 120, "active": 1, "failovers": 2, "answered_locally": 0},
}
PREFER_REPLY = {"ok": True, "pinned": "6aa7bfd3", "choice": "6aa7bfd3"}
CLEAR_REPLY = {"ok": True, "pinned": None, "choice": "6aa7bfd3"}
REFRESH_NOTHING = {
    "ok": True,
    "added": [],
    "removed": [],
    "health_changes": [],
    "choice": "6aa7bfd3",
}
WATCHING = {"ok": True, "watching": True, "choice": "6aa7bfd3"}
NOT_FOUND = {"ok": False, "error": {"code": "not_found", "message": "no agent matches 'zz'"}}


def canned(server: FakeControl) -> None:
    """Give every command a plausible reply."""
    server.replies.update(
        list=line(list_reply()),
        status=line(STATUS_REPLY),
        prefer=line(PREFER_REPLY),
        refresh=line(REFRESH_NOTHING),
    )


class TestRequests:
    @pytest.mark.parametrize(
        ("args", "requests"),
        [
            (["list"], [{"v": 1, "cmd": "list"}]),
            (["status"], [{"v": 1, "cmd": "status"}]),
            (["refresh"], [{"v": 1, "cmd": "refresh"}]),
            (["--json", "prefer", "6aa7"], [{"v": 1, "cmd": "prefer", "id": "6aa7"}]),
            (
                ["prefer", "/tmp/ssh-AbCd/agent.4242"],
                [
                    {"v": 1, "cmd": "prefer", "id": "/tmp/ssh-AbCd/agent.4242"},
                    {"v": 1, "cmd": "list"},
                ],
            ),
        ],
    )
    async def test_sends_the_documented_request(
        self, control: FakeControl, args: list[str], requests: list[dict[str, Any]]
    ) -> None:
        """Each command sends exactly the request objects of docs/control-protocol.md."""
        canned(control)
        status, _, stderr = await ctl(control.path, *args)
        assert (status, stderr, control.requests) == (0, "", requests)

    async def test_prefer_clear_sends_clear_and_says_so(self, control: FakeControl) -> None:
        """`prefer --clear` sends {"clear": true}, asks nothing more, and prints "pin cleared"."""
        control.replies["prefer"] = line(CLEAR_REPLY)
        assert await ctl(control.path, "prefer", "--clear") == (0, "pin cleared\n", "")
        assert control.requests == [{"v": 1, "cmd": "prefer", "clear": True}]


class TestHumanOutput:
    async def test_list_is_an_aligned_table_marking_the_choice(self, control: FakeControl) -> None:
        """`list` prints one aligned row per agent, * on the choice, - for unknowns, the pin; an
        agent without a kind (from a daemon older than local agents) is forwarded."""
        canned(control)
        assert await ctl(control.path, "list") == (
            0,
            (
                "  ID        KIND       HEALTH   KEYS  LATENCY  AGE  SERVED/FAILED  PATH"
                "                            REASON\n"
                "* 6aa7bfd3  forwarded  healthy     2    0.7ms   3m  14/0           "
                "/tmp/ssh-AbCd/agent.4242        pinned\n"
                "  9f8e7d6c  forwarded  slow       11   2150ms   3h  120/1          "
                "/tmp/ssh-QqQq/agent.77          slow\n"
                "  0c1d2e3f  forwarded  unknown     -        -   2d  0/3            "
                "/home/me/.ssh/agent/s.x.sshd.y  unknown: not probed yet\n"
                "pinned: 6aa7bfd3\n"
            ),
            "",
        )

    async def test_list_with_no_backends_says_so(self, control: FakeControl) -> None:
        """An empty registry is one plain sentence, not an empty table."""
        empty: dict[str, Any] = {"ok": True, "choice": None, "pinned": None, "backends": []}
        control.replies["list"] = line(empty)
        assert await ctl(control.path, "list") == (0, "no agents found\n", "")

    async def test_list_shows_a_local_agent_as_local(self, control: FakeControl) -> None:
        """An agent named with --local-agent says so in the KIND column."""
        local = {
            **backends(time.time())[0],
            "kind": "local",
            "path": "/run/user/1000/ssh-agent.socket",
            "reason": "healthy, local: used while no forwarded agent is healthy or slow",
        }
        control.replies["list"] = line(
            {"ok": True, "choice": local["id"], "pinned": None, "backends": [local]}
        )
        status, stdout, _ = await ctl(control.path, "list")
        assert (status, stdout.splitlines()[1].split()[:3]) == (0, ["*", "6aa7bfd3", "local"])

    async def test_list_says_when_nothing_is_usable(self, control: FakeControl) -> None:
        """With backends but no choice, no row is marked and a last line says none is usable."""
        reply = {"ok": True, "choice": None, "pinned": None, "backends": backends(time.time())[2:]}
        control.replies["list"] = line(reply)
        status, stdout, _ = await ctl(control.path, "list")
        assert (status, [row[:1] for row in stdout.splitlines()]) == (0, [" ", " ", "n"])
        assert stdout.endswith("\nno usable agent right now\n")

    async def test_status_prints_key_value_lines(self, control: FakeControl) -> None:
        """`status` prints each field as `key: value`, uptime in units, nested counters inline,
        and says "agents" where the protocol's field says `backends`."""
        control.replies["status"] = line(STATUS_REPLY)
        assert await ctl(control.path, "status") == (
            0,
            (
                "pid: 4242\n"
                f"version: {__version__}\n"
                "uptime: 1h 2m\n"
                "socket_path: /tmp/switcher-1000/agent.sock\n"
                "control_path: /tmp/switcher-1000/control.sock\n"
                "agents_dirs: /home/me/.ssh/agent, /tmp\n"
                "agents: 2\n"
                "healthy: 1\n"
                "pinned: none\n"
                "choice: 6aa7bfd3\n"
                "connections: total=120 active=1 failovers=2 answered_locally=0\n"
            ),
            "",
        )

    async def test_status_flags_a_version_mismatch(self, control: FakeControl) -> None:
        """A daemon of another version gets a client_version line, so the mismatch shows."""
        control.replies["status"] = line({"ok": True, "pid": 1, "version": "9.9.9"})
        assert await ctl(control.path, "status") == (
            0,
            f"pid: 1\nversion: 9.9.9\nclient_version: {__version__}\n",
            "",
        )

    async def test_prefer_names_the_pinned_path(self, control: FakeControl) -> None:
        """`prefer ID` prints the pinned id with its socket path, looked up with `list`."""
        canned(control)
        assert await ctl(control.path, "prefer", "6aa7") == (
            0,
            "pinned 6aa7bfd3 (/tmp/ssh-AbCd/agent.4242)\n",
            "",
        )

    async def test_prefer_a_dead_backend_says_what_is_used_meanwhile(
        self, control: FakeControl
    ) -> None:
        """Pinning a backend that is not the choice says its health and which one is used."""
        listing = list_reply()
        listing["backends"][2]["health"] = "dead"
        control.replies.update(
            prefer=line({"ok": True, "pinned": "0c1d2e3f", "choice": "6aa7bfd3"}),
            list=line(listing),
        )
        assert await ctl(control.path, "prefer", "0c1d") == (
            0,
            (
                "pinned 0c1d2e3f (/home/me/.ssh/agent/s.x.sshd.y)\n"
                "it is dead, so new connections use 6aa7bfd3 until it recovers\n"
            ),
            "",
        )

    async def test_prefer_succeeds_even_if_the_lookup_fails(self, control: FakeControl) -> None:
        """The pin is made even when the follow-up `list` gets no reply: exit 0, id only."""
        control.replies.update(prefer=line(PREFER_REPLY), list=None)
        assert await ctl(control.path, "prefer", "6aa7") == (0, "pinned 6aa7bfd3\n", "")

    async def test_refresh_with_no_changes(self, control: FakeControl) -> None:
        """A refresh that changed nothing says so, then the choice."""
        control.replies["refresh"] = line(REFRESH_NOTHING)
        assert await ctl(control.path, "refresh") == (
            0,
            "nothing changed\nchoice: 6aa7bfd3\n",
            "",
        )

    async def test_refresh_lists_what_changed(self, control: FakeControl) -> None:
        """A refresh prints one line per added, removed and re-rated backend, then the choice."""
        added, removed, _ = backends(time.time())
        reply = {
            "ok": True,
            "added": [added],
            "removed": [removed],
            "health_changes": [{"id": "0c1d2e3f", "from": "healthy", "to": "dead"}],
            "choice": None,
        }
        control.replies["refresh"] = line(reply)
        assert await ctl(control.path, "refresh") == (
            0,
            (
                "added 6aa7bfd3 (healthy) /tmp/ssh-AbCd/agent.4242\n"
                "removed 9f8e7d6c /tmp/ssh-QqQq/agent.77\n"
                "0c1d2e3f: healthy -> dead\n"
                "choice: none\n"
            ),
            "",
        )


class TestJsonOutput:
    @pytest.mark.parametrize("json_first", [True, False], ids=["before", "after"])
    @pytest.mark.parametrize(
        ("args", "reply"),
        [
            (["list"], None),
            (["status"], STATUS_REPLY),
            (["prefer", "6aa7"], PREFER_REPLY),
            (["refresh"], REFRESH_NOTHING),
        ],
    )
    async def test_prints_the_reply_as_one_json_line(
        self,
        control: FakeControl,
        args: list[str],
        reply: dict[str, Any] | None,
        json_first: bool,
    ) -> None:
        """--json, before or after the command, prints exactly the daemon's reply on one line."""
        sent = reply or list_reply()
        control.replies[args[0]] = line(sent)
        argv = ["--json", *args] if json_first else [*args, "--json"]
        status, stdout, stderr = await ctl(control.path, *argv)
        assert (status, stdout.count("\n"), json.loads(stdout), stderr) == (0, 1, sent, "")


class TestFailures:
    @pytest.mark.parametrize(
        "args", [["list"], ["status"], ["refresh"], ["watch"], ["prefer", "zz"]]
    )
    async def test_an_error_reply_exits_1_with_its_message(
        self, control: FakeControl, args: list[str]
    ) -> None:
        """A `{"ok": false}` reply prints the daemon's message to stderr and exits 1."""
        control.replies[args[0]] = line(NOT_FOUND)
        assert await ctl(control.path, *args) == (1, "", "switcher: no agent matches 'zz'\n")

    async def test_an_error_with_only_a_code_prints_the_code(self, control: FakeControl) -> None:
        """An error reply without a message still says something: its code."""
        control.replies["list"] = line({"ok": False, "error": {"code": "busy"}})
        assert await ctl(control.path, "list") == (1, "", "switcher: busy\n")

    async def test_a_daemon_that_refuses_before_reading_is_heard(
        self, short_tmp: Path, nursery: trio.Nursery
    ) -> None:
        """A daemon that says `busy` and hangs up unread is still heard: its message, exit 1."""
        busy = {"ok": False, "error": {"code": "busy", "message": "too many control connections"}}

        async def refuse(stream: trio.SocketStream) -> None:
            async with stream:
                await stream.send_all(line(busy))

        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(short_tmp / "c.sock"))
        sock.listen(8)
        await nursery.start(trio.serve_listeners, refuse, [trio.SocketListener(sock)])
        assert await ctl(short_tmp / "c.sock", "status") == (
            1,
            "",
            "switcher: too many control connections\n",
        )

    async def test_an_endless_line_is_cut_off_at_the_limit(self, control: FakeControl) -> None:
        """A reply line longer than the client's limit is refused, not read into memory forever."""

        async def endless(stream: trio.SocketStream) -> None:
            await stream.send_all(b"x" * (_control_client.MAX_REPLY_BYTES + 1))
            await trio.sleep_forever()

        control.scripts["watch"] = endless
        assert await ctl(control.path, "watch") == (
            1,
            "",
            (
                f"switcher: the daemon at {control.path} sent a line longer than "
                f"{_control_client.MAX_REPLY_BYTES} bytes\n"
            ),
        )

    async def test_an_error_reply_with_json_is_printed_too(self, control: FakeControl) -> None:
        """With --json an error reply still goes to stdout, for scripts, and the status is 1."""
        control.replies["prefer"] = line(NOT_FOUND)
        status, stdout, stderr = await ctl(control.path, "prefer", "zz", "--json")
        assert (status, json.loads(stdout), stderr) == (
            1,
            NOT_FOUND,
            "switcher: no agent matches 'zz'\n",
        )

    @pytest.mark.parametrize(
        ("reply", "complaint"),
        [
            (b"garbage\n", "sent a reply that is not JSON: 'garbage'"),
            (b"\xff\xfe{}\n", "sent a reply that is not JSON: '\ufffd\ufffd{}'"),
            (b"[1, 2]\n", "sent a reply that is not a JSON object"),
            (b'{"ok": true, "backends"', "closed the connection in mid-reply"),
            (None, "closed the connection without replying"),
        ],
        ids=["garbage", "not-utf8", "not-an-object", "truncated", "no-reply"],
    )
    async def test_a_broken_reply_exits_1_with_one_line(
        self, control: FakeControl, reply: bytes | None, complaint: str
    ) -> None:
        """A reply that is not a whole JSON object line is one clear stderr line and exit 1."""
        control.replies["list"] = reply
        assert await ctl(control.path, "list") == (
            1,
            "",
            f"switcher: the daemon at {control.path} {complaint}\n",
        )

    @pytest.mark.parametrize(
        "reply",
        [{"ok": True}, {"backends": []}, {"ok": False}, {"ok": False, "error": {"code": 7}}],
        ids=["missing-field", "missing-ok", "error-without-detail", "error-of-wrong-type"],
    )
    async def test_a_reply_of_the_wrong_shape_exits_1_without_a_traceback(
        self, control: FakeControl, reply: dict[str, Any]
    ) -> None:
        """JSON that does not follow the protocol is reported in one line, exit 1."""
        control.replies["list"] = line(reply)
        status, stdout, stderr = await ctl(control.path, "list")
        assert (status, stdout, stderr.count("\n"), stderr[:10]) == (1, "", 1, "switcher: ")

    @pytest.mark.parametrize("args", [["prefer"], ["prefer", "6aa7", "--clear"], ["lsit"]])
    def test_bad_usage_exits_2(self, short_tmp: Path, args: list[str]) -> None:
        """`prefer` needs exactly one of ID and --clear; unknown commands are usage errors too."""
        result = run_cli("ctl", "--control-path", str(short_tmp / "c.sock"), *args)
        assert (result.returncode, result.stdout, result.stderr[:6]) == (2, "", "usage:")


# The daemon refuses root without --allow-root, so the hint says it to root.
START = "switcher daemon --allow-root" if os.geteuid() == 0 else "switcher daemon"


def no_daemon(path: Path) -> str:
    return f"switcher: no daemon at {path} (start one with: {START} --control-path {path})\n"


class TestNoDaemon:
    def test_a_missing_socket_exits_3(self, short_tmp: Path) -> None:
        """Nothing at the control path: exit 3, naming the path and how to start a daemon."""
        path = short_tmp / "c.sock"
        result = run_cli("ctl", "--control-path", str(path), "status")
        assert (result.returncode, result.stdout, result.stderr) == (3, "", no_daemon(path))

    def test_a_stale_socket_exits_3(self, short_tmp: Path) -> None:
        """A socket file nobody listens on (a dead daemon's) is "no daemon" too, exit 3."""
        path = short_tmp / "c.sock"
        make_socket_file(str(path))
        result = run_cli("ctl", "--control-path", str(path), "list", "--json")
        assert (result.returncode, result.stdout, result.stderr) == (3, "", no_daemon(path))

    def test_an_unusable_path_exits_1_with_the_reason(self) -> None:
        """A path no socket can have (too long) is not "no daemon": exit 1 and why."""
        path = "/tmp/" + "x" * 200
        result = run_cli("ctl", "--control-path", path, "list")
        assert (result.returncode, result.stderr) == (
            1,
            f"switcher: cannot connect to {path}: AF_UNIX path too long\n",
        )

    @pytest.mark.parametrize(
        "error", [TimeoutError("timed out"), BlockingIOError(errno.EAGAIN, "try again")]
    )
    def test_a_full_backlog_is_not_no_daemon(self, short_tmp: Path, error: OSError) -> None:
        """A connect that times out or gets EAGAIN means a daemon too busy to accept: exit 1."""
        failure = _control_client.connect_error(Daemon(str(short_tmp), None), error)
        assert (str(failure), failure.status) == (
            f"the daemon at {short_tmp} is not accepting connections",
            1,
        )

    @pytest.mark.parametrize(
        ("euid", "command"), [(1000, "switcher daemon"), (0, "switcher daemon --allow-root")]
    )
    def test_the_default_path_suggests_the_plain_command(
        self, monkeypatch: pytest.MonkeyPatch, euid: int, command: str
    ) -> None:
        """At the default control path the hint is plain `switcher daemon`; as root, with
        --allow-root, without which the daemon refuses root."""
        monkeypatch.setattr(os, "geteuid", lambda: euid)
        error = _control_client.connect_error(
            Daemon(None, None), FileNotFoundError(errno.ENOENT, "No such file")
        )
        assert (str(error), error.status) == (
            f"no daemon at {paths.default_control_path()} (start one with: {command})",
            3,
        )

    def test_a_socket_path_finds_its_control_socket_and_names_itself_in_the_hint(
        self, short_tmp: Path
    ) -> None:
        """--socket-path alone looks at that socket's own control socket (the daemon's rule),
        and the hint starts a daemon on that socket."""
        socket_path = str(short_tmp / "s.sock")
        result = run_cli("ctl", "--socket-path", socket_path, "status")
        control = _defaults.control_path_for(socket_path)
        assert (result.returncode, result.stdout, result.stderr) == (
            3,
            "",
            (
                f"switcher: no daemon at {control} "
                f"(start one with: {START} --socket-path {socket_path})\n"
            ),
        )

    async def test_control_path_wins_over_socket_path(self, control: FakeControl) -> None:
        """Given both, before or after the command, --control-path is the socket used."""
        control.replies["status"] = line(STATUS_REPLY)
        elsewhere = "/nonexistent/s.sock"
        before = await ctl(control.path, "--socket-path", elsewhere, "status", "--json")
        after = await ctl(control.path, "status", "--socket-path", elsewhere, "--json")
        assert [(status, json.loads(out), err) for status, out, err in (before, after)] == [
            (0, STATUS_REPLY, "")
        ] * 2


class TestTimeouts:
    """In-process, with the client's reply timeout shortened, in a worker thread."""

    async def test_a_silent_daemon_times_out(
        self,
        control: FakeControl,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A daemon that never answers a request: one line naming the timeout, exit 1."""
        monkeypatch.setattr(_control_client, "REPLY_TIMEOUT_S", 0.2)

        async def silent(_stream: trio.SocketStream) -> None:
            await trio.sleep_forever()

        control.scripts["watch"] = silent
        with trio.fail_after(HANG_GUARD_S):
            status = await trio.to_thread.run_sync(
                main, ["ctl", "--control-path", str(control.path), "watch"]
            )
        assert (status, capsys.readouterr().err) == (
            1,
            f"switcher: the daemon at {control.path} did not reply within 0.2 s\n",
        )

    async def test_watch_events_may_be_far_apart(
        self,
        control: FakeControl,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The reply timeout covers the first watch reply only, never the wait for events."""
        monkeypatch.setattr(_control_client, "REPLY_TIMEOUT_S", 0.2)

        async def slow(stream: trio.SocketStream) -> None:
            await stream.send_all(line(WATCHING))
            await trio.sleep(1)
            await stream.send_all(line({"event": "pin_changed", "pinned": "0c1d2e3f"}))

        control.scripts["watch"] = slow
        with trio.fail_after(HANG_GUARD_S):
            status = await trio.to_thread.run_sync(
                main, ["ctl", "--control-path", str(control.path), "watch", "--json"]
            )
        assert (status, capsys.readouterr()) == (
            0,
            (line(WATCHING).decode() + '{"event": "pin_changed", "pinned": "0c1d2e3f"}\n', ""),
        )


STAMP = re.compile(rb"^\d\d:\d\d:\d\d ")


class TestWatch:
    async def test_prints_each_event_as_it_arrives(self, control: FakeControl) -> None:
        """Watch lines appear while the connection is open (flushed), and exit 0 when it closes."""
        more = trio.Event()
        now = time.time()

        async def script(stream: trio.SocketStream) -> None:
            await stream.send_all(line(WATCHING))
            await stream.send_all(line({"event": "backend_added", "backend": backends(now)[1]}))
            await more.wait()
            await stream.send_all(
                line({"event": "health_changed", "id": "6aa7bfd3", "from": "healthy", "to": "dead"})
                + line({"event": "choice_changed", "choice": "9f8e7d6c", "previous": "6aa7bfd3"})
                + line({"event": "pin_changed", "pinned": None})
                + line({"event": "backend_removed", "id": "6aa7bfd3", "path": "/tmp/ssh-A/agent.1"})
                + line({"event": "choice_changed", "choice": None, "previous": "9f8e7d6c"})
                + line({"event": "future_thing", "n": 1})
            )

        control.scripts["watch"] = script
        with trio.fail_after(HANG_GUARD_S):
            async with running(
                "ctl", "--control-path", str(control.path), "watch", stdout=subprocess.PIPE
            ) as process:
                assert process.stdout is not None
                out = LineReader(process.stdout)
                first = [await out.line(), await out.line()]
                more.set()
                rest = []
                while (received := await out.line()) is not None:
                    rest.append(received)
                assert await process.wait() == 0
        assert all(received is not None and STAMP.match(received) for received in first + rest)
        assert [STAMP.sub(b"", received or b"").decode() for received in first + rest] == [
            "watching; choice 6aa7bfd3\n",
            "added 9f8e7d6c (slow) /tmp/ssh-QqQq/agent.77\n",
            "6aa7bfd3: healthy -> dead\n",
            "choice 9f8e7d6c (was 6aa7bfd3)\n",
            "pin cleared\n",
            "removed 6aa7bfd3 /tmp/ssh-A/agent.1\n",
            "choice none (was 9f8e7d6c)\n",
            'future_thing {"n":1}\n',
        ]
        assert control.requests == [{"v": 1, "cmd": "watch"}]

    async def test_json_prints_every_line_as_sent(self, control: FakeControl) -> None:
        """`watch --json` prints the daemon's lines unchanged, the first reply included."""
        sent = line(WATCHING) + line({"event": "pin_changed", "pinned": "0c1d2e3f"})

        async def script(stream: trio.SocketStream) -> None:
            await stream.send_all(sent)

        control.scripts["watch"] = script
        assert await ctl(control.path, "watch", "--json") == (0, sent.decode(), "")

    async def test_an_error_line_mid_watch_exits_1(self, control: FakeControl) -> None:
        """An error object instead of an event ends the watch with its message and exit 1."""

        async def script(stream: trio.SocketStream) -> None:
            await stream.send_all(line(WATCHING) + line(NOT_FOUND))

        control.scripts["watch"] = script
        status, stdout, stderr = await ctl(control.path, "watch")
        assert (status, STAMP.sub(b"", stdout.encode()), stderr) == (
            1,
            b"watching; choice 6aa7bfd3\n",
            "switcher: no agent matches 'zz'\n",
        )

    async def test_a_reader_that_goes_away_ends_the_watch_quietly(
        self, control: FakeControl
    ) -> None:
        """When the pipe's reader exits (`watch | head -1`), the next event ends watch with 0."""
        reader_gone = trio.Event()

        async def script(stream: trio.SocketStream) -> None:
            await stream.send_all(line(WATCHING))
            await reader_gone.wait()
            await stream.send_all(line({"event": "pin_changed", "pinned": None}))
            await trio.sleep_forever()

        control.scripts["watch"] = script
        with trio.fail_after(HANG_GUARD_S):
            async with running(
                "ctl",
                "--control-path",
                str(control.path),
                "watch",
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ) as process:
                assert process.stdout is not None
                assert process.stderr is not None
                assert await LineReader(process.stdout).line() is not None
                await process.stdout.aclose()
                reader_gone.set()
                assert await process.wait() == 0
                assert await process.stderr.receive_some() == b""

    async def test_ctrl_c_elsewhere_exits_130_without_a_traceback(
        self, control: FakeControl
    ) -> None:
        """SIGINT while waiting for any other reply exits 130 (the shell's Ctrl-C), quietly."""
        asked = trio.Event()

        async def stall(_stream: trio.SocketStream) -> None:
            asked.set()
            await trio.sleep_forever()

        control.scripts["refresh"] = stall
        with trio.fail_after(HANG_GUARD_S):
            async with running(
                "ctl", "--control-path", str(control.path), "refresh", stderr=subprocess.PIPE
            ) as process:
                assert process.stderr is not None
                await asked.wait()
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 130
                assert await process.stderr.receive_some() == b""

    async def test_ctrl_c_exits_0_without_a_traceback(self, control: FakeControl) -> None:
        """SIGINT while watching ends the client with status 0 and nothing on stderr."""

        async def script(stream: trio.SocketStream) -> None:
            await stream.send_all(line(WATCHING))
            await trio.sleep_forever()

        control.scripts["watch"] = script
        with trio.fail_after(HANG_GUARD_S):
            async with running(
                "ctl",
                "--control-path",
                str(control.path),
                "watch",
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ) as process:
                assert process.stdout is not None
                assert process.stderr is not None
                assert await LineReader(process.stdout).line() is not None
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 0
                assert await process.stderr.receive_some() == b""


class TestFormatting:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (-3, "0s"),
            (0, "0s"),
            (59.9, "59s"),
            (60, "1m"),
            (3599, "59m"),
            (3600, "1h"),
            (86399, "23h"),
            (86400, "1d"),
            (40 * 86400, "40d"),
        ],
    )
    def test_age_is_the_largest_whole_unit(self, seconds: float, text: str) -> None:
        """AGE rounds down to the largest whole unit, and clock skew shows as 0s."""
        assert _render.format_age(seconds) == text

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [(42.9, "42s"), (185, "3m 5s"), (3600, "1h 0m"), (4 * 86400 + 7300, "4d 2h")],
    )
    def test_uptime_shows_two_units(self, seconds: float, text: str) -> None:
        """Uptime is shown in its two largest units."""
        assert _render.format_duration(seconds) == text

    @pytest.mark.parametrize(
        ("ms", "text"), [(None, "-"), (0.04, "0.0ms"), (9.94, "9.9ms"), (10.0, "10ms")]
    )
    def test_latency(self, ms: float | None, text: str) -> None:
        """Latency keeps one decimal below 10 ms, none above, and is - when never probed."""
        assert _render.format_latency(ms) == text
