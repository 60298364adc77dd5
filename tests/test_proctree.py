"""Reading our own processes from a /proc tree: what is read, what is refused, and chains."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fakeproc import BOOT_TIME, FakeProc
from switcher.core._proctree import (
    Chain,
    Process,
    ProcessTable,
    Stop,
    parse_environ,
    parse_stat,
)


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def table(proc: FakeProc) -> ProcessTable:
    return ProcessTable(uid=proc.uid, root=str(proc.root))


class TestParsing:
    def test_stat_fields_after_a_comm_with_spaces_and_parentheses(self) -> None:
        """comm may hold ") (" and spaces; fields are counted from the last ")"."""
        rest = " ".join(["S", "7", "9", "9", "34817", "-1", *["0"] * 13, "4567", "99"])
        assert parse_stat(f"42 (tmux: a) (b)) {rest}".encode()) == (
            42,
            "tmux: a) (b)",
            7,
            34817,
            4567,
        )

    def test_environ_keeps_only_the_wanted_variables_first_value(self) -> None:
        """Only SSH_AUTH_SOCK, TMUX, TMUX_PANE and STY are kept; a repeated name keeps its first."""
        data = b"HOME=/h\0SSH_AUTH_SOCK=/a\0SSH_AUTH_SOCK=/b\0TMUX=/t,1,0\0TMUX_PANE=%1\0STY=9.x\0"
        assert parse_environ(data) == {
            "auth_sock": "/a",
            "tmux": "/t,1,0",
            "tmux_pane": "%1",
            "sty": "9.x",
        }

    def test_tmux_socket_is_the_part_before_the_last_two_commas(self) -> None:
        """A socket path with a comma in it survives: TMUX is SOCKET,PID,SESSION."""
        process = Process(pid=1, ppid=0, start=0, comm="sh", tty=0, tmux="/tmp/a,b/default,12,0")
        assert process.tmux_socket == "/tmp/a,b/default"


class TestRead:
    def test_reads_our_process(self, proc: FakeProc) -> None:
        """An own process is read whole: parent, start, terminal, the wanted variables."""
        proc.add(10, 5, comm="ssh-add", start=77, tty=34817, env={"SSH_AUTH_SOCK": "/x"})
        assert table(proc).read(10) == Process(
            pid=10, ppid=5, start=77, comm="ssh-add", tty=34817, auth_sock="/x"
        )

    @pytest.mark.parametrize("owner", ["root", "other"])
    def test_never_reads_a_process_that_is_not_ours(self, proc: FakeProc, owner: str) -> None:
        """Another uid's process, or one that is not dumpable, is refused before any read."""
        proc.add(10, 5, owner=owner, env={"SSH_AUTH_SOCK": "/x"})
        assert table(proc).read(10) is None

    def test_a_process_whose_environment_cannot_be_read_is_skipped(self, proc: FakeProc) -> None:
        """A process that exits between its stat and its environ is no process at all."""
        proc.add(10, 5, environ_readable=False)
        assert table(proc).read(10) is None

    def test_missing_and_nonsense_pids_are_none(self, proc: FakeProc) -> None:
        """Pid 0, a negative pid and a pid with no entry read as nothing."""
        assert [table(proc).read(pid) for pid in (0, -3, 999)] == [None, None, None]

    def test_a_garbled_stat_is_skipped(self, proc: FakeProc) -> None:
        """A stat file that does not parse is no process, not a crash."""
        proc.add(10, 5)
        (proc.root / "10" / "stat").write_text("10 (bash")
        assert table(proc).read(10) is None

    def test_boot_time_comes_from_btime(self, proc: FakeProc) -> None:
        assert table(proc).boot_time() == BOOT_TIME

    def test_no_boot_time_without_proc_stat(self, tmp_path: Path) -> None:
        assert ProcessTable(uid=os.getuid(), root=str(tmp_path)).boot_time() is None


class TestChain:
    def test_walks_up_to_a_parent_that_is_not_ours(self, proc: FakeProc) -> None:
        """Client, shell, then sshd's session process (not dumpable): the chain ends there."""
        proc.add(100, 90, comm="sshd", start=900, owner="root")
        proc.add(101, 100, start=1000)
        proc.add(150, 101, comm="ssh-add", start=1100)
        chain = table(proc).chain(150)
        assert [p.pid for p in chain.processes] == [150, 101]
        assert chain.stop is Stop.NOT_OURS

    def test_ends_at_pid_one(self, proc: FakeProc) -> None:
        proc.add(20, 1, start=5)
        proc.add(21, 20, start=6)
        assert [p.pid for p in table(proc).chain(21).processes] == [21, 20]
        assert table(proc).chain(21).stop is Stop.INIT

    def test_a_parent_that_started_after_its_child_is_a_reused_pid(self, proc: FakeProc) -> None:
        """The real parent exited and a newer process took its pid: the walk stops short."""
        proc.add(101, 7, start=5000, env={"SSH_AUTH_SOCK": "/tmp/ssh-b/agent.7"})
        proc.add(150, 101, start=1100)
        chain = table(proc).chain(150)
        assert [p.pid for p in chain.processes] == [150]
        assert chain.stop is Stop.REUSED

    def test_a_parent_that_exited_ends_the_chain(self, proc: FakeProc) -> None:
        proc.add(150, 101, start=1100)
        assert table(proc).chain(150).stop is Stop.GONE

    def test_a_process_not_ours_gives_an_empty_chain(self, proc: FakeProc) -> None:
        proc.add(150, 1, owner="other")
        assert table(proc).chain(150) == Chain((), Stop.NOT_OURS)

    def test_a_loop_is_cut_at_the_depth_limit(self, proc: FakeProc) -> None:
        """Even a view where a process is its own ancestor terminates."""
        proc.add(30, 31, start=1)
        proc.add(31, 30, start=1)
        chain = table(proc).chain(30)
        assert chain.stop is Stop.DEPTH

    def test_pids_lists_numeric_entries(self, proc: FakeProc) -> None:
        proc.add(3, 1)
        proc.add(12, 1)
        (proc.root / "self").mkdir()
        assert table(proc).pids() == [3, 12]
