"""End to end: two laptops on one tmux session, each client gets its own laptop's agent.

Each laptop is a terminal: a window of a root-owned tmux server on the laptop side running
`ssh -tt -A` into sshd, which the test types into the way a person would. Commands typed
there report back through files (see `_tmux.Pane`).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from _switcher import Daemon, World, running_daemon
from _system import (
    UserAccount,
    describe,
    forwarded_agent_sockets,
    remove_tree,
    run_as,
    short_dir,
    wait_until,
)
from _tmux import Pane, PaneResult, Tmux

from switcher.core._tmux import CACHE_LIFETIME

if TYPE_CHECKING:
    from _openssh import ClientAgent

pytestmark = pytest.mark.e2e

# Hang guard for the whole test: two interactive logins, two tmux servers, a daemon and a
# few hundred client runs on a loaded 2-core machine. It turns a hang into a failure.
TEST_GUARD = 240

# Hang guard for a single wait inside the test (a login, a tmux client attaching).
STEP_GUARD = 60

# Requests the pane's background loop must have answered after session B is gone
# before the test stops it: enough to show that the fallback holds, not just begins.
ANSWERS_AFTER_LOGOUT = 20

# The laptop side runs as root, which the suite already is.
LAPTOP = UserAccount(name="root", uid=0, gid=0, home=Path("/root"))


async def log_in(
    world: World, laptop: Tmux, name: str, agent: ClientAgent, results: Path
) -> tuple[Pane, Path]:
    """Open a laptop terminal running `ssh -tt -A` with `agent`; return it and its socket."""
    before = set(forwarded_agent_sockets(world.user))
    ssh = [*world.sshd.ssh_argv(key=agent.key, forward_agent=True), "-tt"]
    command = shlex.join(["env", f"SSH_AUTH_SOCK={agent.socket}", *ssh])
    await laptop.command("-f", "/dev/null", "new-session", "-d", "-s", name, "-x", "160", command)
    with trio.fail_after(STEP_GUARD):
        await wait_until(lambda: set(forwarded_agent_sockets(world.user)) - before != set())
    (socket,) = set(forwarded_agent_sockets(world.user)) - before
    return Pane(tmux=laptop, target=name, results=results), socket


async def client_activity(remote: Tmux) -> dict[str, int]:
    """Each remote tmux client's tty and its last input, in whole seconds."""
    listed = await remote.command("list-clients", "-F", "#{client_tty} #{client_activity}")
    return {tty: int(second) for tty, second in (line.split() for line in listed.splitlines())}


async def wait_for_clients(remote: Tmux, count: int) -> None:
    with trio.fail_after(STEP_GUARD):
        while True:
            with contextlib.suppress(RuntimeError):  # no server yet
                if len(await client_activity(remote)) == count:
                    return
            await trio.sleep(0.05)


async def settle(remote: Tmux) -> None:
    """Make the next keystroke the newest input, unambiguously.

    tmux reports activity in whole seconds, so wait for a second after every client's
    last input; and the daemon reuses tmux's answer for CACHE_LIFETIME, so let the one
    from the previous command expire.
    """
    await trio.sleep(CACHE_LIFETIME)
    latest = max((await client_activity(remote)).values(), default=0)
    with trio.fail_after(STEP_GUARD):
        await wait_until(lambda: int(time.time()) > latest)


def ctl_argv(world: World, daemon: Daemon) -> list[str]:
    return [str(world.switcher.executable), "ctl", "--socket-path", str(daemon.socket)]


async def ctl_list(world: World, daemon: Daemon) -> list[dict[str, Any]]:
    """`switcher ctl list --json` as the test user: the backends."""
    result = await run_as(world.user, [*ctl_argv(world, daemon), "list", "--json"])
    assert result.returncode == 0, describe(result)
    listed: list[dict[str, Any]] = json.loads(result.stdout)["backends"]
    return listed


async def wait_healthy(world: World, daemon: Daemon, sockets: set[Path]) -> dict[Path, str]:
    """Wait until the daemon has probed every session's agent healthy; return their ids."""
    with trio.fail_after(STEP_GUARD):
        while True:
            listed = await ctl_list(world, daemon)
            if {(b["path"], b["health"]) for b in listed} == {(str(s), "healthy") for s in sockets}:
                return {Path(b["path"]): b["id"] for b in listed}
            await trio.sleep(0.05)


def chosen_by(daemon: Daemon) -> list[str]:
    """The chosen_by of every connection the daemon logged, in order."""
    events = [json.loads(line) for line in daemon.log.read_text().splitlines() if "{" in line]
    return [e["chosen_by"] for e in events if e.get("event") == "switcher.proxy.connection_closed"]


class TestTwoLaptops:
    async def test_each_client_gets_the_agent_of_its_own_laptop(self, world: World) -> None:
        """Whoever typed last in tmux is served by their own laptop; plain shells by their
        own session; others by the newest; and B's logout falls back to A without a failure."""
        agent_a, agent_b = world.agents
        key_a, key_b = agent_a.key.public_line, agent_b.key.public_line
        laptop_dir = short_dir("swe2e-l-", mode=0o700)
        laptop = Tmux(account=LAPTOP, socket=laptop_dir / "t")
        remote = Tmux(account=world.user, socket=world.workdir / "tmux.sock")
        results = world.workdir
        try:
            with trio.fail_after(TEST_GUARD):
                async with running_daemon(world.switcher, world.user, world.workdir) as daemon:
                    ask = f"SSH_AUTH_SOCK={shlex.quote(str(daemon.socket))} ssh-add -L"
                    a, socket_a = await log_in(world, laptop, "a", agent_a, results)
                    b, socket_b = await log_in(world, laptop, "b", agent_b, results)
                    ids = await wait_healthy(world, daemon, {socket_a, socket_b})

                    # Plain shells: each session's own agent, although B is the newer.
                    assert await a.run(ask) == PaneResult(0, key_a)
                    assert await b.run(ask) == PaneResult(0, key_b)
                    # A process outside every session: the newest, as without affinity.
                    outside = await run_as(
                        world.user, ["ssh-add", "-L"], SSH_AUTH_SOCK=str(daemon.socket)
                    )
                    assert (outside.returncode, outside.stdout.decode().strip()) == (0, key_b)

                    # One tmux session, started from A, attached from both.
                    tmux = f"tmux -S {shlex.quote(str(remote.socket))} -f /dev/null"
                    await a.type_line(f"{tmux} new-session -s work")
                    await wait_for_clients(remote, 1)
                    await b.type_line(f"{tmux} attach-session -t work")
                    await wait_for_clients(remote, 2)

                    # Whoever typed last is served by their own laptop.
                    for pane, key in ((b, key_b), (a, key_a), (b, key_b)):
                        await settle(remote)
                        assert await pane.run(ask) == PaneResult(0, key), pane.target

                    # ctl why, typed in the pane, says so; ctl list shows who each serves.
                    await settle(remote)
                    why = await b.run(shlex.join(ctl_argv(world, daemon)) + " why")
                    assert why.returncode == 0, why
                    assert why.output.splitlines()[-1] == (
                        f"=> agent {ids[socket_b]} ({socket_b}), chosen by tmux_client"
                    ), why.output
                    served = {
                        backend["path"]: (len(backend["sessions"]), len(backend["tmux_clients"]))
                        for backend in await ctl_list(world, daemon)
                    }
                    assert served == {str(socket_a): (1, 1), str(socket_b): (1, 1)}

                    # B typed last; a loop in the pane asks while B's laptop hangs up.
                    await settle(remote)
                    log, stop, done = (results / f"loop.{n}" for n in ("log", "stop", "done"))
                    # One line per run: its exit status and the comment of the key it saw.
                    # disown: no job notice from the pane's shell lands in a later output.
                    await b.type_line(
                        f'( while [ ! -e {stop} ]; do k=$({ask} 2>&1); echo "$? ${{k##* }}"'
                        f" >>{log}; done; touch {done} ) & disown"
                    )

                    def runs() -> list[str]:
                        return log.read_text().splitlines() if log.exists() else []

                    with trio.fail_after(STEP_GUARD):
                        await wait_until(lambda: len(runs()) > 5)
                    await laptop.command("kill-session", "-t", "b")
                    with trio.fail_after(STEP_GUARD):
                        await wait_until(
                            lambda: socket_b not in forwarded_agent_sockets(world.user)
                        )
                        at_logout = len(runs())
                        await wait_until(lambda: len(runs()) >= at_logout + ANSWERS_AFTER_LOGOUT)
                        stop.touch()
                        await wait_until(done.exists)
                    comment_a, comment_b = key_a.split()[-1], key_b.split()[-1]
                    assert set(runs()) <= {f"0 {comment_a}", f"0 {comment_b}"}
                    assert set(runs()[:5]) == {f"0 {comment_b}"}
                    # The loop runs one at a time: only the first line after at_logout can
                    # come from a run that began while B was still there.
                    assert set(runs()[at_logout + 1 :]) == {f"0 {comment_a}"}
                    await settle(remote)
                    assert await a.run(ask) == PaneResult(0, key_a)

                    # The log says how each connection's agent was chosen.
                    seen = chosen_by(daemon)
                    assert {"session", "rank", "tmux_client"} <= set(seen), seen
        finally:
            await laptop.kill_server()
            await remote.kill_server()
            remove_tree(laptop_dir)
