"""End to end: the issue's scenarios the other modules leave out, on real OpenSSH.

Two sessions from two laptops, steered with `switcher ctl prefer` and failing over when
the pinned one logs out; and a destination-constrained key (`ssh-add -h`), whose hops
the laptop's agent enforces through session-bind@openssh.com, used through switcher.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
from _openssh import (
    DESTINATION_CONSTRAINTS_SINCE,
    ClientAgent,
    Sshd,
    known_hosts_line,
    known_hosts_name,
    openssh_version,
    running_constrained_agent,
    running_sshd,
    ssh_once,
    ssh_session,
)
from _switcher import World, running_daemon
from _system import (
    POLL_INTERVAL,
    UserAccount,
    describe,
    remove_tree,
    run_as,
    short_dir,
    tail,
    wait_until,
)

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterator

    from _openssh import ShellResult, SshSession

pytestmark = pytest.mark.e2e

# Hang guard for a whole test: logins, a daemon and a few dozen client runs on a loaded
# 2-core CI machine. Generous on purpose; it turns a hang into a failure, nothing more.
TEST_GUARD = 120

# Hang guard for one command (ssh-add, switcher ctl, an outbound ssh), so that a hang
# names the command instead of tripping the whole-test guard.
STEP_GUARD = 30

# Hang guard for the daemon to notice a change it promises to notice soon, not before the
# very next request (a new session, a socket that has gone).
SETTLE_GUARD = 30

# Client loops asking through switcher at once while the pinned session logs out: more
# than one, so that some request is likely in flight at every moment of the logout.
CLIENT_LOOPS = 3

# Answers each loop must have had in a phase before the test moves on, so that every
# phase is covered by requests from every loop.
ANSWERS_PER_PHASE = 2

# What ssh exits with when it fails, for authentication and connection failures alike;
# the message tells them apart.
SSH_FAILED = 255


async def run_bounded(
    account: UserAccount, argv: list[str], **extra_env: str
) -> subprocess.CompletedProcess[bytes]:
    """Run a command as `account`; fail the test, naming the command, if it hangs."""
    with trio.move_on_after(STEP_GUARD):
        return await run_as(account, argv, **extra_env)
    pytest.fail(f"{shlex.join(argv)} as {account.name} hung for {STEP_GUARD}s")


async def list_keys(account: UserAccount, socket: Path) -> tuple[int, list[str]]:
    """`ssh-add -L` through `socket` as `account`: its exit status and the key lines."""
    result = await run_bounded(account, ["ssh-add", "-L"], SSH_AUTH_SOCK=str(socket))
    return result.returncode, result.stdout.decode().splitlines()


async def wait_for_keys(account: UserAccount, socket: Path, expected: list[str]) -> None:
    """Ask through `socket` until `ssh-add -L` lists `expected`, every answer a success."""
    answers: list[tuple[int, list[str]]] = []
    with trio.move_on_after(SETTLE_GUARD):
        while True:
            answers.append(await list_keys(account, socket))
            assert answers[-1][0] == 0, answers[-1]
            if answers[-1][1] == expected:
                return
            await trio.sleep(POLL_INTERVAL)
    pytest.fail(f"ssh-add -L never listed {expected}; the last answers were {answers[-5:]}")


async def ctl(world: World, *args: str) -> dict[str, Any]:
    """Run `switcher ctl ARGS --json` as the test user and return the daemon's reply."""
    # The daemon `running_daemon` starts has no --control-path: ctl finds its control
    # socket from the agent socket, as a user would.
    daemon = ["--socket-path", str(world.workdir / "agent.sock")]
    argv = [str(world.switcher.executable), "ctl", *daemon, *args, "--json"]
    result = await run_bounded(world.user, argv)
    assert result.returncode == 0, describe(result)
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


async def wait_for_listing(
    world: World, condition: str, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll `switcher ctl list` until `check(reply)` holds; fail, saying `condition`, if not."""
    reply: dict[str, Any] = {}
    with trio.move_on_after(SETTLE_GUARD):
        while True:
            reply = await ctl(world, "list")
            if check(reply):
                return reply
            await trio.sleep(POLL_INTERVAL)
    pytest.fail(f"switcher ctl list never showed {condition}; the last reply was {reply}")


def backend_id(reply: dict[str, Any], path: Path) -> str:
    """The id of the backend whose socket is `path` in a `list` reply."""
    ids = [backend["id"] for backend in reply["backends"] if backend["path"] == str(path)]
    assert len(ids) == 1, reply
    found: str = ids[0]
    return found


@attrs.frozen
class Answer:
    """One `ssh-add -L` of a client loop: the phases it started and ended in, what it got."""

    started: str
    finished: str
    returncode: int
    keys: tuple[str, ...]
    stderr: str


@attrs.define
class ClientLoops:
    """Client loops asking through switcher over and over, recording every answer."""

    account: UserAccount
    socket: Path
    phase: str
    answers: list[Answer] = attrs.Factory(list)
    stop: trio.Event = attrs.Factory(trio.Event)

    async def ask_until_stopped(self) -> None:
        """Run `ssh-add -L` back to back until told to stop."""
        while not self.stop.is_set():
            started = self.phase
            result = await run_bounded(
                self.account, ["ssh-add", "-L"], SSH_AUTH_SOCK=str(self.socket)
            )
            self.answers.append(
                Answer(
                    started=started,
                    finished=self.phase,
                    returncode=result.returncode,
                    keys=tuple(result.stdout.decode().splitlines()),
                    stderr=result.stderr.decode(errors="replace"),
                )
            )

    def count(self, phase: str) -> int:
        """How many requests started and were answered within `phase`."""
        return sum(answer.started == answer.finished == phase for answer in self.answers)

    async def wait_for_answers(self, phase: str) -> None:
        """Wait until the loops have had, on average, their share of answers in `phase`."""
        await wait_until(lambda: self.count(phase) >= CLIENT_LOOPS * ANSWERS_PER_PHASE)


class TestPreferAndFailover:
    """`switcher ctl prefer` steers new connections, and a pin dies with its session."""

    async def test_pinned_older_session_then_failover_without_failures(self, world: World) -> None:
        """The newer key serves, `prefer` picks the older, and its logout fails no request."""
        older_agent, newer_agent = world.agents
        older_key, newer_key = older_agent.key.public_line, newer_agent.key.public_line
        with trio.fail_after(TEST_GUARD):
            async with contextlib.AsyncExitStack() as stack:
                older = await stack.enter_async_context(
                    ssh_session(world.sshd, older_agent, world.workdir)
                )
                newer = await stack.enter_async_context(
                    ssh_session(world.sshd, newer_agent, world.workdir)
                )
                daemon = await stack.enter_async_context(
                    running_daemon(world.switcher, world.user, world.workdir)
                )

                # Unpinned, the newer session wins.
                await wait_for_keys(world.user, daemon.socket, [newer_key])

                # Pin the older session by the id `ctl list` gives its forwarded socket.
                both = {(str(older.agent_socket), "healthy"), (str(newer.agent_socket), "healthy")}
                listing = await wait_for_listing(
                    world,
                    "both sessions healthy",
                    lambda reply: (
                        {(backend["path"], backend["health"]) for backend in reply["backends"]}
                        == both
                    ),
                )
                older_id = backend_id(listing, older.agent_socket)
                newer_id = backend_id(listing, newer.agent_socket)
                pinned = await ctl(world, "prefer", older_id)
                assert pinned == {
                    "ok": True,
                    "pinned": older_id,
                    "path": str(older.agent_socket),
                    "choice": older_id,
                }
                assert await list_keys(world.user, daemon.socket) == (0, [older_key])

                # Log the pinned session out while clients keep asking.
                loops = ClientLoops(account=world.user, socket=daemon.socket, phase="pinned")
                async with trio.open_nursery() as nursery:
                    for _ in range(CLIENT_LOOPS):
                        nursery.start_soon(loops.ask_until_stopped)
                    await loops.wait_for_answers("pinned")
                    loops.phase = "logout"
                    await older.logout()
                    loops.phase = "after"
                    await loops.wait_for_answers("after")
                    loops.stop.set()

                # Every request succeeds with one of the two keys; one answered before the
                # logout began gets the pinned key, one begun after it ended the other.
                def expected(answer: Answer) -> set[tuple[str, ...]]:
                    if answer.finished == "pinned":
                        return {(older_key,)}
                    if answer.started == "after":
                        return {(newer_key,)}
                    return {(older_key,), (newer_key,)}

                wrong = [
                    answer
                    for answer in loops.answers
                    if answer.returncode != 0 or answer.keys not in expected(answer)
                ]
                assert wrong == [], f"{len(loops.answers)} answers, these wrong: {wrong}"

                # The pin went with its session; the newer one serves.
                listing = await wait_for_listing(
                    world, "the pin gone", lambda reply: reply["pinned"] is None
                )
                assert (
                    listing["pinned"],
                    listing["choice"],
                    [backend["path"] for backend in listing["backends"]],
                ) == (None, newer_id, [str(newer.agent_socket)])
                assert await list_keys(world.user, daemon.socket) == (0, [newer_key])


@pytest.fixture
def other_sshd(
    e2e_user: UserAccount, laptop_agents: tuple[ClientAgent, ClientAgent]
) -> Iterator[Sshd]:
    """A second sshd with a host key of its own, accepting the same laptop keys.

    At teardown it prints what it logged, which pytest shows only on failure.
    """
    directory = short_dir("swe2e-s-")
    try:
        with running_sshd(directory, e2e_user, [agent.key for agent in laptop_agents]) as server:
            try:
                yield server
            finally:
                print(f"----- other sshd -----\n{tail(server.log)}")
    finally:
        remove_tree(directory)


@attrs.frozen
class ConstrainedLaptop:
    """A laptop agent whose one key may only log in to sshd, and from there to sshd again."""

    agent: ClientAgent
    # Both sshds' host keys under the names ssh looks them up by; readable by the test user.
    known_hosts: Path


@pytest.fixture
def constrained_laptop(
    e2e_user: UserAccount,
    sshd: Sshd,
    other_sshd: Sshd,
    laptop_agents: tuple[ClientAgent, ClientAgent],
    workdir: Path,
) -> Iterator[ConstrainedLaptop]:
    """An ssh-agent holding the first laptop key with destination constraints (`ssh-add -h`).

    The constraints permit the first hop, laptop to sshd, and a second hop, sshd to the
    test user on sshd; nothing else. Skips where OpenSSH is too old for `ssh-add -h`.
    """
    version = openssh_version()
    if version is None or version < DESTINATION_CONSTRAINTS_SINCE:
        pytest.skip(f"ssh-add -h needs OpenSSH 8.9 or later; this is {version}")
    # In the test's own directory, so the outbound ssh in the session, run as the test
    # user, checks host keys against the same file ssh-add looked the constraints up in.
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(
        "".join(f"{known_hosts_line(server)}\n" for server in (sshd, other_sshd))
    )
    known_hosts.chmod(0o644)
    first_hop = known_hosts_name(sshd)
    destinations = [first_hop, f"{first_hop}>{e2e_user.name}@{first_hop}"]
    directory = short_dir("swe2e-c-", mode=0o700)
    try:
        with running_constrained_agent(
            directory / "agent.sock",
            laptop_agents[0].key,
            directory / "agent.log",
            known_hosts=known_hosts,
            destinations=destinations,
        ) as agent:
            yield ConstrainedLaptop(agent=agent, known_hosts=known_hosts)
    finally:
        print(f"----- constrained agent -----\n{tail(directory / 'agent.log')}")
        remove_tree(directory)


def hop_argv(target: Sshd, known_hosts: Path, key_public: Path) -> list[str]:
    """An outbound ssh, run in a session, that logs in to `target` with one agent key.

    The host key must be known (StrictHostKeyChecking=yes), so a failure can only come
    from authentication; the agent is the only place the key can come from. When the
    agent hides the key (it does once bound to a host its constraints do not permit),
    ssh tries the .pub file as a private key, says "Load key ...: error in libcrypto",
    and then "Permission denied".
    """
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-i",
        str(key_public),
        "-a",
        "-p",
        str(target.port),
        target.destination(),
        "true",
    ]


async def hop(session: SshSession, socket: Path, argv: list[str]) -> ShellResult:
    """Run an outbound ssh inside the session with SSH_AUTH_SOCK=`socket`."""
    command = f"SSH_AUTH_SOCK={shlex.quote(str(socket))} {shlex.join(argv)}"
    with trio.move_on_after(STEP_GUARD):
        return await session.run(command)
    pytest.fail(f"{command} hung in the session for {STEP_GUARD}s")


class TestDestinationConstraints:
    """A key bound to hops by `ssh-add -h` works through switcher exactly as it does direct."""

    async def test_constrained_hops_through_switcher(
        self, world: World, other_sshd: Sshd, constrained_laptop: ConstrainedLaptop
    ) -> None:
        """Through switcher a constrained key reaches the permitted hop and is refused elsewhere."""
        agent, known_hosts = constrained_laptop.agent, constrained_laptop.known_hosts
        with trio.fail_after(TEST_GUARD):
            # Control: the other sshd takes this key from an unconstrained agent, so a
            # refusal below is the constraint's doing.
            direct = await ssh_once(other_sshd, world.agents[0], "true")
            assert direct.returncode == 0, describe(direct)

            async with (
                running_daemon(world.switcher, world.user, world.workdir) as daemon,
                ssh_session(world.sshd, agent, world.workdir) as session,
            ):
                await wait_for_keys(world.user, daemon.socket, [agent.key.public_line])
                permitted = hop_argv(world.sshd, known_hosts, agent.key.public)
                forbidden = hop_argv(other_sshd, known_hosts, agent.key.public)
                results = {
                    (via, target): await hop(session, socket, argv)
                    for via, socket in (
                        ("switcher", daemon.socket),
                        ("forwarded", session.agent_socket),
                    )
                    for target, argv in (("permitted", permitted), ("forbidden", forbidden))
                }

        for via in ("switcher", "forwarded"):
            allowed, refused = results[via, "permitted"], results[via, "forbidden"]
            assert (allowed.returncode, allowed.output) == (0, ""), (via, allowed)
            assert refused.returncode == SSH_FAILED, (via, refused)
            assert "Permission denied" in refused.output, (via, refused)
        assert (results["switcher", "permitted"], results["switcher", "forbidden"]) == (
            results["forwarded", "permitted"],
            results["forwarded", "forbidden"],
        )
