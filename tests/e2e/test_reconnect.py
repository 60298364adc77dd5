"""End to end: a real sshd forwards real agents, and switcher relays to the live one.

The laptop (two ssh-agents, the ssh client) runs as root; the server side is a test user
logging in to a private sshd on loopback. Nothing here is faked.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from _openssh import ClientAgent, Sshd, outbound_ssh_command, ssh_once, ssh_session
from _switcher import Daemon, World, daemon_argv, running_daemon
from _system import (
    POLL_INTERVAL,
    TEARDOWN_GRACE,
    UserAccount,
    describe,
    forwarded_agent_sockets,
    is_running,
    run_as,
    signal_pid,
    tail,
    wait_until,
    wait_until_serving,
)
from _tmux import Pane, PaneResult, Tmux

if TYPE_CHECKING:
    import subprocess

pytestmark = pytest.mark.e2e

# Hang guard for a whole test: several logins, a daemon and a tmux server on a loaded
# 2-core CI machine. Generous on purpose; it turns a hang into a failure, nothing more.
TEST_GUARD = 120

# Hang guard for one ssh-add through the daemon, so that a relay which never answers
# fails with a message that says so instead of tripping the whole-test guard.
REQUEST_GUARD = 30

# Hang guard for the daemon to notice a new session. It promises to notice soon, not
# before the very next request (a session that logs in while another is live is found
# by its directory watcher), so the test waits for the change instead of racing it.
SETTLE_GUARD = 30

# ssh-add's documented exit statuses: 1 when the agent answered with an error (or has no
# keys), 2 when no agent could be reached at all.
SSH_ADD_AGENT_ERROR = 1
SSH_ADD_NO_AGENT = 2


async def through_agent(
    account: UserAccount, socket: Path, *args: str
) -> subprocess.CompletedProcess[bytes]:
    """Run `ssh-add ARGS` as the test user against `socket`; fail the test if it hangs."""
    with trio.move_on_after(REQUEST_GUARD):
        return await run_as(account, ["ssh-add", *args], SSH_AUTH_SOCK=str(socket))
    pytest.fail(f"ssh-add {shlex.join(args)} through {socket} hung for {REQUEST_GUARD}s")


async def wait_for_keys(account: UserAccount, socket: Path, expected: list[str]) -> None:
    """Ask through `socket` until `ssh-add -L` lists `expected`; fail if it never does.

    Every answer on the way must still be a success: while the daemon has not noticed
    the newest session it may relay to an older live one, but it must never fail.
    """
    answers: list[tuple[int, list[str]]] = []
    with trio.move_on_after(SETTLE_GUARD):
        while True:
            result = await through_agent(account, socket, "-L")
            answers.append(listed_keys(result))
            assert result.returncode == 0, describe(result)
            if answers[-1][1] == expected:
                return
            await trio.sleep(POLL_INTERVAL)
    pytest.fail(f"ssh-add -L never listed {expected}; the last answers were {answers[-5:]}")


def listed_keys(result: subprocess.CompletedProcess[bytes]) -> tuple[int, list[str]]:
    """The exit status and output lines of `ssh-add -l` / `-L`, for whole-value comparison."""
    return result.returncode, result.stdout.decode().splitlines()


class TestHarness:
    """The harness itself works, so a failure elsewhere points at switcher, not the rig."""

    async def test_one_shot_login_forwards_the_agent(
        self, sshd: Sshd, laptop_agents: tuple[ClientAgent, ClientAgent], workdir: Path
    ) -> None:
        """A one-shot `ssh -A` command sees the laptop key through its forwarded agent."""
        del workdir  # requested for its log report on failure
        agent = laptop_agents[0]
        with trio.fail_after(TEST_GUARD):
            result = await ssh_once(sshd, agent, "ssh-add -L")
        assert listed_keys(result) == (0, [agent.key.public_line]), describe(result)

    async def test_session_socket_lives_until_logout(
        self,
        e2e_user: UserAccount,
        sshd: Sshd,
        laptop_agents: tuple[ClientAgent, ClientAgent],
        workdir: Path,
    ) -> None:
        """A session's forwarded socket is the user's, serves the laptop key, and goes at logout."""
        agent = laptop_agents[1]
        with trio.fail_after(TEST_GUARD):
            async with ssh_session(sshd, agent, workdir) as session:
                assert session.agent_socket in forwarded_agent_sockets(e2e_user)
                result = await through_agent(e2e_user, session.agent_socket, "-L")
                assert listed_keys(result) == (0, [agent.key.public_line]), describe(result)
                await session.logout()
            assert session.agent_socket not in forwarded_agent_sockets(e2e_user)


class TestDaemonProcess:
    """The daemon starts, says where it listens, and stops the way the contract says."""

    async def test_path_is_per_user_default(self, world: World) -> None:
        """`switcher path` prints /tmp/switcher-$UID/agent.sock for the user who runs it."""
        with trio.fail_after(TEST_GUARD):
            result = await run_as(world.user, [str(world.switcher.executable), "path"])
        assert (result.returncode, result.stdout.decode()) == (
            0,
            f"/tmp/switcher-{world.user.uid}/agent.sock\n",
        ), describe(result)

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
    async def test_signal_stops_cleanly(self, world: World, signum: signal.Signals) -> None:
        """SIGTERM or SIGINT ends the daemon with status 0 and removes its socket."""
        with trio.fail_after(TEST_GUARD):
            async with running_daemon(world.switcher, world.user, world.workdir) as daemon:
                status = await daemon.stop(signum)
                assert (status, daemon.socket.exists()) == (0, False)


class TestReconnect:
    """The reason switcher exists: an old tmux pane keeps working across logins."""

    async def test_old_tmux_pane_uses_the_new_session(self, world: World) -> None:
        """A tmux pane from an ended session lists, signs and logs in through the next one."""
        user, workdir = world.user, world.workdir
        agent = world.agents[0]
        switcher = shlex.quote(str(world.switcher.executable))
        tmux = Tmux(account=user, socket=workdir / "tmux.sock")
        pane = Pane(tmux=tmux, target="old", results=workdir)
        fingerprint = agent.key.fingerprint_line()
        daemon_pid: int | None = None
        try:
            with trio.fail_after(TEST_GUARD):
                # (1) Log in with agent forwarding.
                async with ssh_session(world.sshd, agent, workdir) as first:
                    # (2) Start the daemon from inside the session, detached from it the way
                    # a user would (setsid, output to a file), with every default: socket
                    # path and agent directories are part of what this proves.
                    log = shlex.quote(str(workdir / "daemon.log"))
                    command = shlex.join(daemon_argv(world.switcher, socket=None))
                    started = await first.run(f"setsid {command} >{log} 2>&1 & echo $!")
                    daemon_pid = pid = int(started.output)
                    where = await first.run(f"{switcher} path")
                    socket = Path(where.output)
                    assert socket == Path(f"/tmp/switcher-{user.uid}/agent.sock")
                    try:
                        await wait_until_serving(socket, alive=lambda: is_running(pid))
                    except RuntimeError as error:
                        pytest.fail(f"{error}; its log:\n{tail(workdir / 'daemon.log')}")

                    # (3) A tmux session started from this login: its panes inherit the
                    # login's own forwarded socket, which dies with it; the pane's shell is
                    # pointed at switcher instead.
                    created = await first.run(
                        f"tmux -S {shlex.quote(str(tmux.socket))} new-session -d -s old"
                        " -x 200 -y 50 'exec bash --noprofile --norc'"
                    )
                    assert created.returncode == 0, created
                    inherited = await pane.run('printf "%s" "$SSH_AUTH_SOCK"')
                    assert inherited == PaneResult(0, str(first.agent_socket))
                    exported = await pane.run(
                        f'export SSH_AUTH_SOCK="$({switcher} path)"; printf "%s" "$SSH_AUTH_SOCK"'
                    )
                    assert exported == PaneResult(0, str(socket))
                    assert await pane.run("ssh-add -l") == PaneResult(0, fingerprint)

                    # (4) The tmux session was created detached (-d): no client is attached,
                    # exactly the state after `tmux detach`.
                    # (5) Log out: sshd removes this session's forwarded socket.
                    await first.logout()

                # Without switcher the pane would be stuck with a dead socket.
                stale = await pane.run(
                    f"SSH_AUTH_SOCK={shlex.quote(str(first.agent_socket))} ssh-add -l"
                )
                assert stale.returncode == SSH_ADD_NO_AGENT, stale

                # (6) Log in again.
                async with ssh_session(world.sshd, agent, workdir) as second:
                    assert second.agent_socket != first.agent_socket
                    # (7) and (8): the old pane lists, signs with, and logs in with the key
                    # forwarded by the new session, each on its first try.
                    assert await pane.run("ssh-add -l") == PaneResult(0, fingerprint)
                    signed = await pane.run(f"ssh-add -T {shlex.quote(str(agent.key.public))}")
                    assert signed.returncode == 0, signed
                    outbound = await pane.run(outbound_ssh_command(world.sshd))
                    assert outbound == PaneResult(0, "")
        finally:
            with trio.move_on_after(TEARDOWN_GRACE, shield=True):
                with contextlib.suppress(RuntimeError):
                    print(f"----- pane -----\n{(await tmux.capture('old')).rstrip()}")
                await tmux.kill_server()
                if daemon_pid is not None:
                    signal_pid(daemon_pid, signal.SIGTERM)
                    stopping = daemon_pid
                    await wait_until(lambda: not is_running(stopping))


class TestNoLiveSession:
    """With nothing to relay to, the daemon fails requests instead of holding them."""

    @pytest.mark.parametrize("history", ["never_logged_in", "after_logout"])
    async def test_ssh_add_fails_without_hanging(self, world: World, history: str) -> None:
        """`ssh-add -l` through the daemon exits with an agent error when no session is live."""
        with trio.fail_after(TEST_GUARD):
            async with running_daemon(world.switcher, world.user, world.workdir) as daemon:
                if history == "after_logout":
                    async with ssh_session(world.sshd, world.agents[0], world.workdir) as session:
                        working = await through_agent(world.user, daemon.socket, "-l")
                        assert working.returncode == 0, describe(working)
                        await session.logout()
                result = await through_agent(world.user, daemon.socket, "-l")
                assert result.returncode in {SSH_ADD_AGENT_ERROR, SSH_ADD_NO_AGENT}, describe(
                    result
                )
                assert daemon.alive()


class TestFailover:
    """Among several live sessions the newest wins, and the next takes over when it ends."""

    @pytest.mark.parametrize("daemon_start", ["before_logins", "after_logins"])
    async def test_newest_session_then_older(self, world: World, daemon_start: str) -> None:
        """`ssh-add -L` comes to show the newer session's key, and the older's once it ends."""
        older_agent, newer_agent = world.agents
        with trio.fail_after(TEST_GUARD):
            async with contextlib.AsyncExitStack() as stack:
                daemon: Daemon | None = None
                if daemon_start == "before_logins":
                    daemon = await stack.enter_async_context(
                        running_daemon(world.switcher, world.user, world.workdir)
                    )
                await stack.enter_async_context(ssh_session(world.sshd, older_agent, world.workdir))
                newer = await stack.enter_async_context(
                    ssh_session(world.sshd, newer_agent, world.workdir)
                )
                if daemon is None:
                    daemon = await stack.enter_async_context(
                        running_daemon(world.switcher, world.user, world.workdir)
                    )

                await wait_for_keys(world.user, daemon.socket, [newer_agent.key.public_line])

                # The newer session's socket is gone (logout waits for that), so the very
                # next request must reach the older session: no settling allowed here.
                await newer.logout()
                result = await through_agent(world.user, daemon.socket, "-L")
                assert listed_keys(result) == (0, [older_agent.key.public_line]), describe(result)
