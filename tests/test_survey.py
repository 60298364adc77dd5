"""Which SSH sessions and tmux clients each agent serves, on fixture /proc trees."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from fakeproc import FakeProc, snapshot
from switcher.core._proctree import ProcessTable
from switcher.core._survey import Served, SessionSeen, TmuxClientSeen, survey, tty_name
from switcher.core._tmux import TmuxQuery
from test_affinity import LEGACY, Tmux, backends, tmux_from_a, tmux_says, two_sessions


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def test_tty_names() -> None:
    """pts/N from stat's tty_nr (major 136 and up, minor split in two); others are None."""
    assert [tty_name(t) for t in (34816, 34819, (137 << 8) | 2, 1024, 0)] == [
        "pts/0",
        "pts/3",
        "pts/258",
        None,
        None,
    ]


async def test_each_agent_lists_its_sessions_and_tmux_clients(proc: FakeProc) -> None:
    """Both sessions and both tmux clients, each under the agent its login forwarded."""
    two_sessions(proc, LEGACY)
    tmux_from_a(proc, LEGACY)
    said = tmux_says(proc, (160, "/dev/pts/1", 100, "$0"), (260, "/dev/pts/3", 200, "$0"))
    b, a = backends(LEGACY)
    table = ProcessTable(uid=proc.uid, root=str(proc.root))
    with trio.fail_after(10):
        served = await survey(table, TmuxQuery(run=Tmux(said)), snapshot(b, a))
    socket = "/tmp/tmux-4242/default"
    assert served == {
        a.id: Served(
            sessions=(SessionSeen(100, 101, "pts/100"),),
            tmux_clients=(TmuxClientSeen("/dev/pts/1", 160, 100, socket),),
        ),
        b.id: Served(
            sessions=(SessionSeen(200, 201, "pts/200"),),
            tmux_clients=(TmuxClientSeen("/dev/pts/3", 260, 200, socket),),
        ),
    }


async def test_a_silent_tmux_still_lists_sessions(proc: FakeProc) -> None:
    """tmux not answering costs the clients, not the sessions."""
    two_sessions(proc, LEGACY)
    tmux_from_a(proc, LEGACY)
    b, a = backends(LEGACY)
    table = ProcessTable(uid=proc.uid, root=str(proc.root))
    with trio.fail_after(10):
        served = await survey(table, TmuxQuery(run=Tmux(None)), snapshot(b, a))
    assert [len(s.tmux_clients) for s in served.values()] == [0, 0]
    assert [s.sessions[0].sshd_pid for s in served.values()] == [200, 100]
