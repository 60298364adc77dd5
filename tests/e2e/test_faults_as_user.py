"""Faults that only an unprivileged daemon can meet: root reads any directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from _system import UserAccount, wait_until_listening
from test_security import control_call, user_daemon, user_process

from switcher.core import FrameDecoder, MessageType, encode

if TYPE_CHECKING:
    from _switcher import SwitcherInstall

pytestmark = pytest.mark.e2e

GUARD_S = 60
FAILURE = encode(MessageType.FAILURE)


async def identities(socket: Path) -> bytes:
    """One REQUEST_IDENTITIES on a fresh connection; the whole reply frame."""
    stream = await trio.open_unix_socket(str(socket))
    async with stream:
        await stream.send_all(encode(MessageType.REQUEST_IDENTITIES))
        decoder = FrameDecoder()
        while (frame := decoder.next_frame()) is None:
            data = await stream.receive_some()
            if not data:
                raise EOFError("closed before a whole reply")
            decoder.feed(data)
    return frame.raw


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_descriptors(pid: int, *, at_most: int | None = None) -> int:
    """The daemon's descriptor count once it has held still for 0.3 s (and, if given, is
    at most ``at_most``): a connection the client just closed takes a moment to go."""
    count, steady_since = open_descriptors(pid), trio.current_time()
    while trio.current_time() - steady_since < 0.3 or (at_most is not None and count > at_most):
        await trio.sleep(0.02)
        current = open_descriptors(pid)
        if current != count:
            count, steady_since = current, trio.current_time()
    return count


class TestUnreadableAgentsDir:
    async def test_an_agents_dir_that_becomes_unreadable(
        self, e2e_user: UserAccount, switcher_install: SwitcherInstall, user_dir: Path
    ) -> None:
        """An agents dir the daemon's user can no longer list is logged once, its sessions
        leave the registry and clients get FAILURE at once; made readable again, its
        session serves, the daemon never stopped and its descriptors are back."""
        agents = user_dir / "agents"
        session = agents / "ssh-unreadable"
        for directory in (agents, session):
            directory.mkdir(mode=0o700)
            os.chown(directory, e2e_user.uid, e2e_user.gid)
        agent_socket = session / "agent.1"
        argv = ["ssh-agent", "-D", "-a", str(agent_socket)]
        with trio.fail_after(GUARD_S):
            async with (
                user_process(e2e_user, argv) as agent,
                user_daemon(switcher_install, e2e_user, user_dir, agents_dirs=[agents]) as daemon,
            ):
                await wait_until_listening(agent_socket, alive=lambda: agent.returncode is None)
                direct = await identities(agent_socket)
                await control_call(daemon.control, {"v": 1, "cmd": "refresh"})
                assert await identities(daemon.socket) == direct
                baseline = await settled_descriptors(daemon.process.pid)

                agents.chmod(0o000)
                try:
                    refreshed = await control_call(daemon.control, {"v": 1, "cmd": "refresh"})
                    unreadable = await identities(daemon.socket)
                finally:
                    agents.chmod(0o700)
                restored = await control_call(daemon.control, {"v": 1, "cmd": "refresh"})
                served = await identities(daemon.socket)
                alive = daemon.process.returncode is None
                descriptors = await settled_descriptors(daemon.process.pid, at_most=baseline)
                warnings = daemon.events("switcher.discovery.dir_unreadable")
        assert [b["path"] for b in refreshed["removed"]] == [str(agent_socket)]
        assert unreadable == FAILURE
        assert [(w["path"], w["reason"]) for w in warnings] == [(str(agents), "Permission denied")]
        assert [b["path"] for b in restored["added"]] == [str(agent_socket)]
        assert (served, alive, descriptors) == (direct, True, baseline)
