"""End to end: the test user's own ssh-agent as the local agent, a real session on top.

The user runs an ssh-agent of their own and names it with `--local-agent`. Before any
session, clients get its key; a laptop logs in with `ssh -A` and clients get the
laptop's key; it logs out and they get the local key again. Client loops ask
throughout, and no request fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from typing import TYPE_CHECKING

import pytest
import trio
from _openssh import ssh_session
from _switcher import World, running_daemon
from _system import UserAccount, describe, run_as, wait_until_listening
from test_scenarios import (
    CLIENT_LOOPS,
    TEST_GUARD,
    Answer,
    ClientLoops,
    list_keys,
    wait_for_keys,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.e2e


@contextlib.asynccontextmanager
async def users_own_agent(account: UserAccount, run_dir: Path) -> AsyncIterator[tuple[Path, str]]:
    """An ssh-agent the user runs at RUN_DIR/ssh-agent.socket, holding a key of theirs.

    Yields the socket and the key's public line; stops the agent afterwards.
    """
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, account.uid, account.gid)
    socket = run_dir / "ssh-agent.socket"
    process = await trio.lowlevel.open_process(
        ["ssh-agent", "-D", "-a", str(socket)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **account.process_options(),
    )
    try:
        await wait_until_listening(socket, alive=lambda: process.returncode is None)
        key = run_dir / "local_key"
        made = await run_as(
            account,
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "local", "-f", str(key)],
        )
        assert made.returncode == 0, describe(made)
        added = await run_as(account, ["ssh-add", str(key)], SSH_AUTH_SOCK=str(socket))
        assert added.returncode == 0, describe(added)
        yield socket, (run_dir / "local_key.pub").read_text().strip()
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            await process.wait()


class TestLocalAgent:
    async def test_local_key_then_the_session_then_local_again(self, world: World) -> None:
        """Local key, the session's key while it lasts, local again: no request fails."""
        laptop = world.agents[0]
        laptop_key = laptop.key.public_line
        with trio.fail_after(TEST_GUARD):
            async with contextlib.AsyncExitStack() as stack:
                local, local_key = await stack.enter_async_context(
                    users_own_agent(world.user, world.workdir / "run")
                )
                daemon = await stack.enter_async_context(
                    running_daemon(
                        world.switcher,
                        world.user,
                        world.workdir,
                        extra=("--local-agent", str(local)),
                    )
                )
                assert await list_keys(world.user, daemon.socket) == (0, [local_key])

                loops = ClientLoops(account=world.user, socket=daemon.socket, phase="local")
                async with trio.open_nursery() as nursery:
                    for _ in range(CLIENT_LOOPS):
                        nursery.start_soon(loops.ask_until_stopped)
                    await loops.wait_for_answers("local")
                    loops.phase = "login"
                    session = await stack.enter_async_context(
                        ssh_session(world.sshd, laptop, world.workdir)
                    )
                    await wait_for_keys(world.user, daemon.socket, [laptop_key])
                    loops.phase = "session"
                    await loops.wait_for_answers("session")
                    loops.phase = "logout"
                    await session.logout()
                    await wait_for_keys(world.user, daemon.socket, [local_key])
                    loops.phase = "after"
                    await loops.wait_for_answers("after")
                    loops.stop.set()

        def expected(answer: Answer) -> set[tuple[str, ...]]:
            if answer.finished == "local" or answer.started == "after":
                return {(local_key,)}
            if answer.started == answer.finished == "session":
                return {(laptop_key,)}
            return {(local_key,), (laptop_key,)}

        wrong = [
            answer
            for answer in loops.answers
            if answer.returncode != 0 or answer.keys not in expected(answer)
        ]
        assert wrong == [], f"{len(loops.answers)} answers, these wrong: {wrong}"
        events = [json.loads(line)["event"] for line in daemon.log.read_text().splitlines()]
        assert [e for e in events if e.startswith("switcher.registry.fallback")] == [
            "switcher.registry.fallback_to_local",
            "switcher.registry.fallback_ended",
            "switcher.registry.fallback_to_local",
        ]
