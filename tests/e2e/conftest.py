"""Fixtures for the end-to-end suite: a test user, a laptop with two agents, sshd, switcher.

The expensive pieces (user, keys, agents, sshd, the install) live for the whole session
and are synchronous, because pytest-trio gives every test its own event loop. Each test
gets a fresh short working directory, and everything the test user still runs is killed
when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import pytest
from _openssh import ClientAgent, Sshd, make_keypair, running_client_agent, running_sshd
from _switcher import SwitcherInstall, World, installed_switcher
from _system import (
    OTHER_USER_NAME,
    UserAccount,
    ensure_user,
    missing_prerequisites,
    remove_tree,
    short_dir,
    sweep_user,
    tail,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture(scope="session")
def e2e_user() -> UserAccount:
    """The test user, created on first use; skips the suite where that is impossible."""
    missing = missing_prerequisites()
    if missing:
        pytest.skip("end-to-end suite needs: " + "; ".join(missing))
    return ensure_user()


@pytest.fixture(scope="session")
def laptop_agents(e2e_user: UserAccount) -> Iterator[tuple[ClientAgent, ClientAgent]]:
    """Two laptop-side ssh-agents, each holding its own fresh ed25519 key."""
    del e2e_user  # requested only so that a machine without the tools skips first
    # 0755 so the test user can read the public keys (for `ssh-add -T`).
    directory = short_dir("swe2e-k-")
    try:
        with contextlib.ExitStack() as stack:
            agents = tuple(
                stack.enter_context(
                    running_client_agent(
                        directory / f"agent{index}.sock",
                        make_keypair(directory, f"laptop{index}"),
                        directory / f"agent{index}.log",
                    )
                )
                for index in (1, 2)
            )
            yield agents[0], agents[1]
    finally:
        remove_tree(directory)


@pytest.fixture(scope="session")
def sshd(e2e_user: UserAccount, laptop_agents: tuple[ClientAgent, ClientAgent]) -> Iterator[Sshd]:
    """A private sshd on loopback that accepts both laptop keys for the test user."""
    directory = short_dir("swe2e-s-")
    try:
        with running_sshd(directory, e2e_user, [agent.key for agent in laptop_agents]) as server:
            yield server
    finally:
        remove_tree(directory)


@pytest.fixture(scope="session")
def switcher_install(e2e_user: UserAccount) -> Iterator[SwitcherInstall]:
    """switcher copied where the test user can run it, checked with `switcher --help`."""
    with installed_switcher(e2e_user) as install:
        yield install


@pytest.fixture(autouse=True)
def _sweep_test_user(e2e_user: UserAccount) -> Iterator[None]:
    """Leave no process of the test user behind, whatever the test did."""
    try:
        yield
    finally:
        sweep_user(e2e_user)


@pytest.fixture
def workdir(e2e_user: UserAccount, sshd: Sshd) -> Iterator[Path]:
    """A short directory owned by the test user, for sockets, logs and pane results.

    At teardown it prints every log the test produced; pytest shows that output only
    when the test failed, which is when it is needed.
    """
    directory = short_dir("swe2e-w-", owner=e2e_user, mode=0o700)
    sshd_log_start = sshd.log_size()
    try:
        yield directory
    finally:
        # Stop the user's processes first, so none writes into the tree being removed.
        sweep_user(e2e_user)
        for log in sorted(directory.rglob("*.log")) + sorted(directory.rglob("*.out")):
            print(f"----- {log.relative_to(directory)} -----\n{tail(log)}")
        print(f"----- sshd (this test) -----\n{tail(sshd.log, start=sshd_log_start)}")
        remove_tree(directory)


@pytest.fixture
def world(
    e2e_user: UserAccount,
    sshd: Sshd,
    laptop_agents: tuple[ClientAgent, ClientAgent],
    switcher_install: SwitcherInstall,
    workdir: Path,
) -> World:
    """The whole rig in one value, for tests that run switcher."""
    return World(
        user=e2e_user,
        sshd=sshd,
        agents=laptop_agents,
        switcher=switcher_install,
        workdir=workdir,
    )


@pytest.fixture(scope="session")
def other_account(e2e_user: UserAccount) -> UserAccount:
    """A second unprivileged account, created on first use, for the security tests."""
    del e2e_user  # requested so that a machine that cannot run the suite skips first
    return ensure_user(OTHER_USER_NAME)


@pytest.fixture
def other_user(other_account: UserAccount) -> Iterator[UserAccount]:
    """The second account, with every process it still runs stopped when the test ends."""
    try:
        yield other_account
    finally:
        sweep_user(other_account)


@pytest.fixture
def user_dir(e2e_user: UserAccount) -> Iterator[Path]:
    """A short directory owned by the test user (0700), for tests that need no sshd.

    At teardown it prints the logs the test produced, which pytest shows only on failure.
    """
    directory = short_dir("swe2e-u-", owner=e2e_user, mode=0o700)
    try:
        yield directory
    finally:
        sweep_user(e2e_user)
        for log in sorted(directory.rglob("*.log")):
            print(f"----- {log.relative_to(directory)} -----\n{tail(log)}")
        remove_tree(directory)
