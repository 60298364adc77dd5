"""The moment the socket file appears, the foreground daemon is safe to signal and to use.

Each test starts the real CLI, waits only until the socket file exists (not
until it answers), and acts at once: that lands in the window between the
bind and the event loop taking over, where a daemon used to die of SIGHUP,
leave its socket behind on SIGTERM, or refuse clients. Each is repeated,
so that a daemon that is safe only some of the time fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from fakes import AgentClient
from procs import ALLOW_ROOT, SWITCHER, accepts, control_request
from switcher import _defaults
from switcher.core import MessageType, encode

# Starts per test: the window is most of start-up, so each attempt almost
# always lands in it; a handful makes a lucky pass on a broken daemon unlikely.
ATTEMPTS = 5
# Every wait in these tests gives up after this long.
HANG_GUARD_S = 20
FAILURE = encode(MessageType.FAILURE)


@attrs.define(eq=False)
class Starting:
    """A foreground daemon that has just created its socket file, and no more."""

    process: trio.Process
    socket_path: Path
    control_path: Path
    log_path: Path

    async def wait_serving(self) -> bytes:
        """Wait until the daemon answers an identities request; return the reply."""
        while not accepts(self.socket_path):
            assert self.process.poll() is None, f"exited with {self.process.returncode}"
            await trio.sleep(0.01)
        client = AgentClient(await trio.open_unix_socket(str(self.socket_path)))
        async with client.stream:
            return await client.request(MessageType.REQUEST_IDENTITIES)


async def start_and_catch_the_socket(
    tmp: Path, *extra: str, control: bool = True, name: str = "s.sock"
) -> Starting:
    """Start ``switcher daemon`` and return as soon as its socket file exists."""
    socket_path = tmp / name
    log_path = tmp / f"{name}.log"
    control_flags = ["--control-path", str(tmp / f"c-{name}")] if control else []
    process = await trio.lowlevel.open_process(
        [
            *SWITCHER,
            "daemon",
            *ALLOW_ROOT,
            *("--socket-path", str(socket_path)),
            *control_flags,
            *("--agents-dirs", str(tmp / "none")),
            *("--log-file", str(log_path)),
            *extra,
        ]
    )
    # As tight as a poll gets without starving the daemon of the second core.
    while not os.path.lexists(socket_path):
        if process.poll() is not None:
            raise AssertionError(f"the daemon exited with {process.returncode} before binding")
        await trio.sleep(0.001)
    control_path = (
        tmp / f"c-{name}" if control else Path(_defaults.control_path_for(str(socket_path)))
    )
    return Starting(process, socket_path, control_path, log_path)


@pytest.fixture
async def processes() -> AsyncIterator[list[trio.Process]]:
    """Daemons a test started, killed when it ends however it ends."""
    started: list[trio.Process] = []
    try:
        yield started
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()
                await process.wait()


@pytest.mark.parametrize("attempt", range(ATTEMPTS))
class TestTheStartupWindow:
    async def test_sighup_is_harmless(
        self,
        short_tmp: Path,
        processes: list[trio.Process],
        attempt: int,  # noqa: ARG002 (repetition)
    ) -> None:
        """SIGHUP the moment the socket exists leaves the daemon running and serving."""
        with trio.fail_after(HANG_GUARD_S):
            daemon = await start_and_catch_the_socket(short_tmp)
            processes.append(daemon.process)
            daemon.process.send_signal(signal.SIGHUP)
            reply = await daemon.wait_serving()
            running = daemon.process.poll() is None
            daemon.process.send_signal(signal.SIGTERM)
            status = await daemon.process.wait()
        assert (reply, running, status) == (FAILURE, True, 0)

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
    async def test_stop_signals_exit_cleanly(
        self,
        short_tmp: Path,
        processes: list[trio.Process],
        attempt: int,  # noqa: ARG002 (repetition)
        signum: int,
    ) -> None:
        """A stop signal the moment the socket exists ends the daemon with status 0, and its
        socket, control socket and lock files are gone."""
        with trio.fail_after(HANG_GUARD_S):
            daemon = await start_and_catch_the_socket(short_tmp)
            processes.append(daemon.process)
            daemon.process.send_signal(signum)
            status = await daemon.process.wait()
        left = sorted(p.name for p in short_tmp.iterdir() if not p.name.endswith(".log"))
        assert (status, left) == (0, [])

    async def test_a_client_is_queued_not_refused(
        self,
        short_tmp: Path,
        processes: list[trio.Process],
        attempt: int,  # noqa: ARG002 (repetition)
    ) -> None:
        """A client connecting the moment the socket exists is queued and answered."""
        with trio.fail_after(HANG_GUARD_S):
            daemon = await start_and_catch_the_socket(short_tmp)
            processes.append(daemon.process)
            client = AgentClient(await trio.open_unix_socket(str(daemon.socket_path)))
            async with client.stream:
                reply = await client.request(MessageType.REQUEST_IDENTITIES)
        assert reply == FAILURE

    @pytest.mark.skipif(shutil.which("ssh-add") is None, reason="needs OpenSSH's ssh-add")
    async def test_ssh_add_is_answered(
        self,
        short_tmp: Path,
        processes: list[trio.Process],
        attempt: int,  # noqa: ARG002 (repetition)
    ) -> None:
        """`ssh-add -l` run the moment the socket exists gets the daemon's answer (no agent:
        "agent refused operation"), never "Connection refused"."""
        with trio.fail_after(HANG_GUARD_S):
            daemon = await start_and_catch_the_socket(short_tmp)
            processes.append(daemon.process)
            result = await trio.run_process(
                ["ssh-add", "-l"],
                env={**os.environ, "SSH_AUTH_SOCK": str(daemon.socket_path)},
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert (result.returncode, result.stdout + result.stderr) == (
            1,
            b"error fetching identities: agent refused operation\n",
        )


class TestDaemonsOnDifferentSockets:
    async def test_both_serve_each_with_its_own_control_socket(
        self, short_tmp: Path, processes: list[trio.Process]
    ) -> None:
        """Two daemons on different --socket-path and no --control-path both serve; the
        control socket of each follows its agent socket and reports that daemon."""
        with trio.fail_after(HANG_GUARD_S):
            first = await start_and_catch_the_socket(short_tmp, control=False, name="a.sock")
            processes.append(first.process)
            second = await start_and_catch_the_socket(short_tmp, control=False, name="b.sock")
            processes.append(second.process)
            replies = [await d.wait_serving() for d in (first, second)]
            statuses = [
                (await control_request(d.control_path, {"v": 1, "cmd": "status"}))["socket_path"]
                for d in (first, second)
            ]
            for daemon in (first, second):
                daemon.process.send_signal(signal.SIGTERM)
            exits = [await d.process.wait() for d in (first, second)]
        assert (replies, statuses, exits) == (
            [FAILURE, FAILURE],
            [str(first.socket_path), str(second.socket_path)],
            [0, 0],
        )
        assert not any(os.path.lexists(d.control_path) for d in (first, second))

    async def test_ctl_finds_each_from_its_socket_path(
        self, short_tmp: Path, processes: list[trio.Process]
    ) -> None:
        """`switcher ctl --socket-path P status` reaches the daemon serving P, for each of two."""
        with trio.fail_after(HANG_GUARD_S):
            daemons = [
                await start_and_catch_the_socket(short_tmp, control=False, name=name)
                for name in ("a.sock", "b.sock")
            ]
            processes.extend(d.process for d in daemons)
            for daemon in daemons:
                await daemon.wait_serving()
            replies = []
            for daemon in daemons:
                result = await trio.run_process(
                    [
                        *SWITCHER,
                        "ctl",
                        "--socket-path",
                        str(daemon.socket_path),
                        "--json",
                        "status",
                    ],
                    capture_stdout=True,
                )
                replies.append(json.loads(result.stdout)["socket_path"])
        assert replies == [str(d.socket_path) for d in daemons]
