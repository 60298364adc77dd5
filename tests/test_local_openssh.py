"""A real ssh-agent as the local agent, behind a real daemon, as sessions come and go.

No session: the local agent's key. A forwarded session appears: its key, as
soon as switcher notices. The session ends: the local key again. A loop of
`ssh-add -L` runs throughout and no request in it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import attrs
import pytest
import trio

from procs import Daemon, start_daemon
from test_openssh import Agents, agents, keygen, ssh_add, stop_daemon

__all__ = ["agents", "stop_daemon"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("ssh-agent", "ssh-add", "ssh-keygen")),
    reason="needs OpenSSH's ssh-agent, ssh-add and ssh-keygen (Debian: openssh-client)",
)


def public(key: Path) -> str:
    return Path(f"{key}.pub").read_text()


async def listed(sock: Path) -> subprocess.CompletedProcess[str]:
    """`ssh-add -L` through ``sock``, in a thread (the loop below must not block trio)."""
    return await trio.to_thread.run_sync(ssh_add, sock, "-L")


async def wait_for_key(sock: Path, key: Path) -> None:
    """Ask until ``key`` is what the agent behind ``sock`` lists (the caller bounds the wait)."""
    while (await listed(sock)).stdout != public(key):
        await trio.sleep(0.02)


@attrs.define(eq=False)
class RequestLoop:
    """`ssh-add -L` through switcher, one after another, until stopped."""

    sock: Path
    answers: list[str] = attrs.Factory(list)  # each answer's keys, in order, deduplicated
    failures: list[str] = attrs.Factory(list)
    count: int = 0

    async def wait_for_answer(self, keys: str) -> None:
        """Wait until the loop's latest answer was ``keys`` (the caller bounds the wait)."""
        while not self.answers or self.answers[-1] != keys:
            await trio.sleep(0.02)

    async def run(self) -> None:
        while True:
            result = await listed(self.sock)
            self.count += 1
            if result.returncode != 0:
                self.failures.append(f"exit {result.returncode}: {result.stderr.strip()}")
            elif not self.answers or self.answers[-1] != result.stdout:
                self.answers.append(result.stdout)


def start_session(agents: Agents, key: Path, stage: Path, name: str) -> Path:
    """A forwarded session that appears at once with its key loaded, as sshd's does.

    The agent starts in a staging directory outside the agents dirs, gets its
    key, and then its whole ssh-XXXX directory is moved into place.
    """
    sock = agents.start(stage / name / "agent.1")
    assert ssh_add(sock, str(key)).returncode == 0
    target = agents.root / "tmp" / name
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    (stage / name).rename(target)
    return target / "agent.1"


class TestLocalAgentAsLastResort:
    async def test_no_session_then_a_session_then_none_again(
        self, short_tmp: Path, agents: Agents, stop_daemon: list[Daemon]
    ) -> None:
        """The local key, the session's key while it lasts, the local key again: no failures."""
        local_key, session_key = keygen(short_tmp / "local"), keygen(short_tmp / "remote")
        run_dir = short_tmp / "run"
        run_dir.mkdir(mode=0o700)
        local = agents.start(run_dir / "ssh-agent.socket")
        assert ssh_add(local, str(local_key)).returncode == 0
        (short_tmp / "d").mkdir()
        (agents.root / "tmp").mkdir(mode=0o700, parents=True)
        with trio.fail_after(60):
            daemon = await start_daemon(
                short_tmp / "d",
                "--local-agent",
                "$XDG_RUNTIME_DIR/ssh-agent.socket",
                agents=agents.dirs,
                env={**os.environ, "XDG_RUNTIME_DIR": str(run_dir)},
            )
            stop_daemon.append(daemon)
        sock = daemon.socket_path
        first = ssh_add(sock, "-L")
        assert (first.returncode, first.stdout) == (0, public(local_key))

        loop = RequestLoop(sock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            with trio.fail_after(30):
                # The loop's first answer comes from the local agent: only
                # then does the session start (noticed at once, it could
                # otherwise beat the loop's first request).
                await loop.wait_for_answer(public(local_key))
            stage = short_tmp / "stage"
            stage.mkdir(mode=0o700)
            # Generous guards: what is promised is well under a second.
            with trio.fail_after(30):
                session = start_session(agents, session_key, stage, "ssh-test000100")
                await wait_for_key(sock, session_key)
                await loop.wait_for_answer(public(session_key))
            # The session ends: sshd removes its socket, and its agent goes.
            with trio.fail_after(30):
                shutil.rmtree(session.parent)
                agents.processes[-1].terminate()
                await trio.to_thread.run_sync(agents.processes[-1].wait)
                await wait_for_key(sock, local_key)
                await loop.wait_for_answer(public(local_key))
            nursery.cancel_scope.cancel()

        assert loop.failures == []
        assert loop.answers == [public(local_key), public(session_key), public(local_key)]
        events = [e["event"] for e in daemon.log_events()]
        assert [e for e in events if str(e).startswith("switcher.registry.fallback")] == [
            "switcher.registry.fallback_to_local",
            "switcher.registry.fallback_ended",
            "switcher.registry.fallback_to_local",
        ]

    async def test_missing_local_agent_is_tried_once_it_is_there(
        self, short_tmp: Path, agents: Agents, stop_daemon: list[Daemon]
    ) -> None:
        """A local agent whose socket appears after the daemon started is used at once."""
        local_key = keygen(short_tmp / "local")
        run_dir = short_tmp / "run"
        run_dir.mkdir(mode=0o700)
        (short_tmp / "d").mkdir()
        with trio.fail_after(60):
            daemon = await start_daemon(
                short_tmp / "d",
                "--local-agent",
                str(run_dir / "ssh-agent.socket"),
                agents=agents.dirs,
            )
            stop_daemon.append(daemon)
        refused = ssh_add(daemon.socket_path, "-l")
        assert (refused.returncode, refused.stderr) == (
            1,
            "error fetching identities: agent refused operation\n",
        )
        local = agents.start(run_dir / "ssh-agent.socket")
        assert ssh_add(local, str(local_key)).returncode == 0
        # Still dead in the registry unless a probe has run since (every 5 s):
        # the relay's last-resort pass over dead agents reaches it anyway.
        after = ssh_add(daemon.socket_path, "-L")
        assert (after.returncode, after.stdout) == (0, public(local_key))
