"""Remembered ancestors: each read once while it lives, read afresh once its pid is another's."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fakeproc import FakeProc, backend, snapshot
from switcher.core._affinity import Affinity
from switcher.core._known import INLINE_READS, KnownProcesses
from switcher.core._proctree import Chain, ProcessTable, Stop

A = "/tmp/ssh-AAAAAAAAAA/agent.100"
B = "/tmp/ssh-BBBBBBBBBB/agent.200"
SWITCHER = "/tmp/switcher-4242/agent.sock"


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


@pytest.fixture
def known(proc: FakeProc) -> Iterator[KnownProcesses]:
    remembered = KnownProcesses(ProcessTable(uid=proc.uid, root=str(proc.root)))
    try:
        yield remembered
    finally:
        remembered.close()


def login(proc: FakeProc, *, shell_env: dict[str, str] | None = None, start: int = 1000) -> None:
    """A login shell 101 (its parent, 1, ends the chain) started with session A's socket."""
    proc.add(101, 1, start=start, env=shell_env or {"SSH_AUTH_SOCK": A})


def client(proc: FakeProc, pid: int, parent: int = 101) -> int:
    return proc.add(pid, parent, comm="ssh-add", start=3000, env={"SSH_AUTH_SOCK": SWITCHER})


def socks(chain: Chain) -> list[tuple[int, str | None]]:
    return [(p.pid, p.auth_sock) for p in chain.processes]


class TestRemembered:
    def test_an_ancestor_is_read_once_while_it_lives(
        self, proc: FakeProc, known: KnownProcesses
    ) -> None:
        """A second client of the same shell gets the shell as first read, though the
        shell's entry now says otherwise (a running process's start does not change)."""
        login(proc)
        known.chain(client(proc, 150))
        (proc.root / "101" / "environ").write_bytes(f"SSH_AUTH_SOCK={B}\0".encode())
        chain = known.chain(client(proc, 151))
        assert (socks(chain), chain.stop, len(known)) == (
            [(151, SWITCHER), (101, A)],
            Stop.INIT,
            1,
        )

    def test_a_pid_held_by_a_new_process_is_read_afresh(
        self, proc: FakeProc, known: KnownProcesses
    ) -> None:
        """The shell exits and a new process, started later, gets its pid: its own
        environment counts, not the remembered one."""
        login(proc)
        known.chain(client(proc, 150))
        shutil.rmtree(proc.root / "101")
        login(proc, shell_env={"SSH_AUTH_SOCK": B}, start=2000)
        chain = known.chain(client(proc, 151))
        assert (socks(chain), chain.stop) == ([(151, SWITCHER), (101, B)], Stop.INIT)

    def test_a_reused_pid_started_after_the_client_is_not_its_parent(
        self, proc: FakeProc, known: KnownProcesses
    ) -> None:
        """A process that took the pid after the client started is a stranger."""
        login(proc)
        known.chain(client(proc, 150))
        shutil.rmtree(proc.root / "101")
        login(proc, shell_env={"SSH_AUTH_SOCK": B}, start=4000)
        chain = known.chain(client(proc, 151))
        assert (socks(chain), chain.stop) == ([(151, SWITCHER)], Stop.REUSED)

    def test_the_client_itself_is_read_afresh_and_not_kept(
        self, proc: FakeProc, known: KnownProcesses
    ) -> None:
        """Each connection reads its client: the same pid may now be another program."""
        login(proc)
        known.chain(client(proc, 150))
        (proc.root / "150" / "environ").write_bytes(f"SSH_AUTH_SOCK={B}\0".encode())
        assert (socks(known.chain(150)), len(known)) == ([(150, B), (101, A)], 1)

    def test_a_parent_that_is_not_ours_is_remembered_as_such(
        self, proc: FakeProc, known: KnownProcesses
    ) -> None:
        """sshd's session process ends the chain, remembered without being read."""
        proc.add(100, 1, comm="sshd", start=900, owner="root")
        proc.add(101, 100, start=1000, env={"SSH_AUTH_SOCK": A})
        known.chain(client(proc, 150))
        chain = known.chain(client(proc, 151))
        assert (socks(chain), chain.stop, len(known)) == (
            [(151, SWITCHER), (101, A)],
            Stop.NOT_OURS,
            2,
        )

    def test_a_vanished_parent_ends_the_chain(self, proc: FakeProc, known: KnownProcesses) -> None:
        login(proc)
        known.chain(client(proc, 150))
        shutil.rmtree(proc.root / "101")
        chain = known.chain(client(proc, 151))
        assert (socks(chain), chain.stop, len(known)) == ([(151, SWITCHER)], Stop.GONE, 0)

    def test_a_full_memory_makes_room(self, proc: FakeProc) -> None:
        """At the limit, exited processes go first, then the oldest; answers stay right."""
        known = KnownProcesses(ProcessTable(uid=proc.uid, root=str(proc.root)), limit=2)
        try:
            for pid in range(101, 105):
                proc.add(pid, pid - 1 if pid > 101 else 1, start=pid, env={"SSH_AUTH_SOCK": A})
            chain = known.chain(client(proc, 150, parent=104))
            assert ([p.pid for p in chain.processes], len(known) <= 2) == (
                [150, 104, 103, 102, 101],
                True,
            )
        finally:
            known.close()

    def test_closing_lets_go_of_every_descriptor(
        self, proc: FakeProc, known: KnownProcesses
    ) -> None:
        login(proc)
        known.chain(client(proc, 150))
        known.close()
        assert len(known) == 0


class TestWhereTheWalkRuns:
    def test_a_walk_of_few_reads_needs_no_thread(
        self, proc: FakeProc, known: KnownProcesses
    ) -> None:
        """Up to INLINE_READS reads the walk finishes at once; a longer one is handed on,
        and once its ancestors are known a new client takes one read."""
        proc.add(101, 1, start=1000, env={"SSH_AUTH_SOCK": A})
        for pid in range(102, 102 + INLINE_READS):
            proc.add(pid, pid - 1, start=1000)
        parent = 101 + INLINE_READS
        first = known.chain_within(client(proc, 150, parent=parent), INLINE_READS)
        known.chain(150)
        second = known.chain_within(client(proc, 151, parent=parent), 1)
        assert (first, second is not None and len(second.processes)) == (None, INLINE_READS + 2)

    async def test_a_long_walk_runs_in_a_thread_and_decides_alike(self, proc: FakeProc) -> None:
        """A client whose ancestors are all new still gets its session."""
        proc.add(101, 1, start=1000, env={"SSH_AUTH_SOCK": A})
        for pid in range(102, 106):
            proc.add(pid, pid - 1, start=1000)
        client(proc, 150, parent=105)
        chooser = Affinity(ProcessTable(uid=proc.uid, root=str(proc.root)))
        try:
            with trio.fail_after(10):
                decision = await chooser.decide(
                    150, snapshot(backend(B, appeared=2.0), backend(A, appeared=1.0))
                )
        finally:
            chooser.known.close()
        assert (decision.chosen_by.value, decision.backend and decision.backend.path) == (
            "session",
            A,
        )


def test_descriptors_are_closed_when_forgotten(proc: FakeProc) -> None:
    """A KnownProcesses nobody closes still gives its descriptors back when it goes."""
    login(proc)
    known = KnownProcesses(ProcessTable(uid=proc.uid, root=str(proc.root)))
    known.chain(client(proc, 150))
    fd = known._entries[101][1]
    del known
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
