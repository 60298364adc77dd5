"""End to end: `ssh -A` from a session back into the same host through switcher.

The inner session's forwarded socket leads back to switcher itself (its ssh client's
agent is switcher). switcher must find that loop, never relay into it, and never let a
request wait on its own chain: the real sshd and OpenSSH tools, no fakes.
"""

from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from _openssh import SSH_COMMON_OPTIONS, ssh_session
from _switcher import World, running_daemon
from _system import is_running, run_as, signal_pid, tail, wait_until
from test_scenarios import STEP_GUARD, TEST_GUARD, wait_for_keys, wait_for_listing

if TYPE_CHECKING:
    import subprocess

    from _openssh import SshSession

pytestmark = pytest.mark.e2e

# The rhythm: 12 requests through switcher over 6 seconds while the loop forms.
REQUESTS = 12
REQUEST_SPACING = 0.5

# What `ssh-add -l` exits with when the agent answers but has nothing to offer
# (switcher answers FAILURE when no agent is left); 2 would mean no agent at all.
ADD_NO_IDENTITIES = 1


async def ssh_add_list(world: World, socket: Path) -> subprocess.CompletedProcess[bytes]:
    """One `ssh-add -l` through `socket`, failing the test (not hanging it) if it hangs."""
    with trio.move_on_after(STEP_GUARD):
        return await run_as(world.user, ["ssh-add", "-l"], SSH_AUTH_SOCK=str(socket))
    pytest.fail(f"ssh-add -l through {socket} hung for {STEP_GUARD}s")


def inner_ssh_script(world: World, socket: Path, key_public: Path, where: Path) -> str:
    """A shell line, run in session 1, that logs in again with `ssh -A` through switcher
    in the background, keeps that session open, and prints the inner ssh's pid.

    IdentitiesOnly with the .pub file: the login can only succeed through the agent.
    """
    keep_open = (
        f'printf "%s\\n" "$SSH_AUTH_SOCK" > {shlex.quote(str(where))}.tmp'
        f" && mv {shlex.quote(str(where))}.tmp {shlex.quote(str(where))} && exec sleep 3600"
    )
    argv = [
        "ssh",
        *SSH_COMMON_OPTIONS,
        "-o",
        "IdentitiesOnly=yes",
        "-i",
        str(key_public),
        "-A",
        "-T",
        "-p",
        str(world.sshd.port),
        world.sshd.destination(),
        keep_open,
    ]
    log = world.workdir / "inner-ssh.log"
    return (
        f"SSH_AUTH_SOCK={shlex.quote(str(socket))} {shlex.join(argv)}"
        f" </dev/null >{shlex.quote(str(log))} 2>&1 & echo $!"
    )


def loop_listed(path: Path) -> Any:
    def check(reply: dict[str, Any]) -> bool:
        return any(
            backend["path"] == str(path) and backend["health"] == "loop"
            for backend in reply["backends"]
        )

    return check


class TestLoopThroughTheSameHost:
    async def test_ssh_back_into_the_same_host_through_switcher(self, world: World) -> None:
        """Requests keep being answered while the loop forms, the inner login works through
        switcher, `ctl list` names the loop, nothing hangs once session 1 ends, and every
        process ends on SIGTERM."""
        laptop = world.agents[0]
        where = world.workdir / "inner-agent-socket"
        answers: list[subprocess.CompletedProcess[bytes]] = []
        with trio.fail_after(TEST_GUARD * 2):
            async with running_daemon(world.switcher, world.user, world.workdir) as daemon:
                session: SshSession
                async with ssh_session(world.sshd, laptop, world.workdir) as session:
                    await wait_for_keys(world.user, daemon.socket, [laptop.key.public_line])

                    async def ask_throughout() -> None:
                        for _ in range(REQUESTS):
                            answers.append(await ssh_add_list(world, daemon.socket))
                            await trio.sleep(REQUEST_SPACING)

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(ask_throughout)
                        started = await session.run(
                            inner_ssh_script(world, daemon.socket, laptop.key.public, where)
                        )
                        assert started.returncode == 0, started
                        inner_pid = int(started.output.split()[-1])
                        await wait_until(where.exists)
                        inner_socket = Path(where.read_text().strip())
                        listing = await wait_for_listing(
                            world, "the inner session's socket as a loop", loop_listed(inner_socket)
                        )

                    # Session 1 ends; the inner ssh (and its loop socket) stays.
                    await session.logout()

                after = [await ssh_add_list(world, daemon.socket) for _ in range(3)]
                # The inner ssh ends on SIGTERM, as does the daemon: no SIGKILL needed.
                signal_pid(inner_pid, signal.SIGTERM)
                with trio.move_on_after(STEP_GUARD):
                    await wait_until(lambda: not is_running(inner_pid))
                inner_still_running = is_running(inner_pid)
                with trio.move_on_after(STEP_GUARD):
                    stopped = await daemon.stop()
                daemon_still_running = daemon.alive()

        failed = [a for a in answers if a.returncode != 0]
        assert (len(answers), failed) == (REQUESTS, []), tail(daemon.log)
        (looped,) = [b for b in listing["backends"] if b["path"] == str(inner_socket)]
        assert "leads back to switcher" in looped["reason"], looped
        assert listing["choice"] != looped["id"]
        assert [a.returncode for a in after] == [ADD_NO_IDENTITIES] * 3
        assert (inner_still_running, daemon_still_running, stopped) == (False, False, 0)
