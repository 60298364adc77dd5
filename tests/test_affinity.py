"""Session affinity on fixture process trees: which agent each kind of client is given.

Two sessions log in, A first, then B (so the ranking alone prefers B). Each has sshd's
session process (not dumpable, so root's in /proc), a login shell whose initial
environment holds the forwarded socket, and clients below it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
import trio

from fakeproc import FakeProc, backend, snapshot
from switcher.core._affinity import Affinity, ChosenBy, Decision, match_session
from switcher.core._backend import Backend, Health
from switcher.core._proctree import ProcessTable
from switcher.core._tmux import TmuxQuery

SWITCHER = "/tmp/switcher-4242/agent.sock"
TMUX = "/tmp/tmux-4242/default"

# Starts in clock ticks after boot; tmux's client_created is in epoch seconds.
A_LOGIN, B_LOGIN, TMUX_START, LATER = 1000, 2000, 1500, 3000


@attrs.frozen
class Layout:
    """Socket paths for the two sessions, in one of OpenSSH's layouts."""

    a: str
    b: str


LEGACY = Layout("/tmp/ssh-AAAAAAAAAA/agent.100", "/tmp/ssh-BBBBBBBBBB/agent.200")
AGENT_DIR = Layout(
    "/home/u/.ssh/agent/s.hosthash00.sshd.aaaaaaaaaa",
    "/home/u/.ssh/agent/s.hosthash00.sshd.bbbbbbbbbb",
)


def two_sessions(proc: FakeProc, layout: Layout) -> None:
    """sshd 100 and 200 (root's in /proc), login shells 101 and 201, clients 150 and 250.

    The login scripts exported switcher's socket, so only the login shells' initial
    environments name the forwarded ones.
    """
    for sshd, path, login in ((100, layout.a, A_LOGIN), (200, layout.b, B_LOGIN)):
        proc.add(sshd, 90, comm="sshd", start=login - 1, owner="root")
        proc.add(sshd + 1, sshd, start=login, tty=34816 + sshd, env={"SSH_AUTH_SOCK": path})
        proc.add(sshd + 50, sshd + 1, comm="ssh-add", start=LATER, env={"SSH_AUTH_SOCK": SWITCHER})


def tmux_from_a(proc: FakeProc, layout: Layout) -> None:
    """A tmux server started from session A, pane shell 501 with client 550, tmux clients
    160 (in A, /dev/pts/1) and 260 (in B, /dev/pts/3)."""
    server_env = {"SSH_AUTH_SOCK": layout.a}
    proc.add(500, 1, comm="tmux: server", start=TMUX_START, env=server_env)
    pane_env = {"SSH_AUTH_SOCK": layout.a, "TMUX": f"{TMUX},500,0", "TMUX_PANE": "%0"}
    proc.add(501, 500, start=TMUX_START, env=pane_env)
    proc.add(550, 501, comm="ssh-add", start=LATER, env=pane_env)
    proc.add(160, 101, comm="tmux: client", start=TMUX_START)
    proc.add(260, 201, comm="tmux: client", start=B_LOGIN + 10)


def tmux_says(proc: FakeProc, *clients: tuple[int, str, int, str]) -> bytes:
    """list-clients/list-panes output: (pid, tty, activity, session) per client."""
    lines = [
        f"c {activity} {int(proc.epoch(TMUX_START if pid == 160 else B_LOGIN + 10))} "
        f"{pid} {session} {tty}"
        for pid, tty, activity, session in clients
    ]
    lines += ["p %0 501 $0", "p %1 777 $1"]
    return ("\n".join(lines) + "\n").encode()


class Tmux:
    """A tmux runner with a canned answer (None: tmux failed; hang: never answers)."""

    def __init__(self, output: bytes | None = None, *, hang: bool = False) -> None:
        self.output = output
        self.hang = hang
        self.calls = 0

    async def __call__(self, command: Sequence[str]) -> bytes | None:
        del command
        self.calls += 1
        if self.hang:
            await trio.sleep_forever()
        return self.output


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def backends(layout: Layout) -> tuple[Backend, Backend]:
    """A and B, ranked: B is newer, so it comes first."""
    return backend(layout.b, appeared=2.0), backend(layout.a, appeared=1.0)


def affinity(proc: FakeProc, tmux: Tmux | None = None) -> Affinity:
    query = TmuxQuery(run=tmux or Tmux(), timeout=0.05)
    return Affinity(ProcessTable(uid=proc.uid, root=str(proc.root)), query)


async def decide(proc: FakeProc, pid: int, *backs: Backend, tmux: Tmux | None = None) -> Decision:
    with trio.fail_after(10):
        return await affinity(proc, tmux).decide(pid, snapshot(*backs))


def outcome(decision: Decision) -> tuple[str, str | None, str | None, int | None]:
    """The parts of a decision a test compares: how, which agent, which client, which sshd."""
    path = decision.backend.path if decision.backend is not None else None
    return decision.chosen_by.value, path, decision.tmux_client, decision.sshd_pid


class TestPlainSessions:
    @pytest.mark.parametrize("layout", [LEGACY, AGENT_DIR], ids=["before-10.1", "10.1"])
    async def test_a_client_gets_its_own_session_though_another_is_newer(
        self, proc: FakeProc, layout: Layout
    ) -> None:
        """Session A's client gets A's agent, found through its login shell's environment."""
        two_sessions(proc, layout)
        decision = await decide(proc, 150, *backends(layout))
        assert outcome(decision) == ("session", layout.a, None, 100)

    async def test_before_10_1_the_login_shells_parent_names_the_socket(
        self, proc: FakeProc
    ) -> None:
        """With no forwarded path in any environment, agent.<sshd pid> still finds the session."""
        proc.add(100, 90, comm="sshd", start=900, owner="root")
        proc.add(101, 100, start=A_LOGIN, env={"SSH_AUTH_SOCK": SWITCHER})
        proc.add(150, 101, start=LATER)
        decision = await decide(proc, 150, *backends(LEGACY))
        assert outcome(decision) == ("session", LEGACY.a, None, 100)

    async def test_a_process_outside_every_session_gets_the_ranking(self, proc: FakeProc) -> None:
        """A cron job (its parent is root's) has no session: the newest agent, as today."""
        proc.add(300, 299, start=LATER)
        decision = await decide(proc, 300, *backends(LEGACY))
        assert outcome(decision) == ("rank", None, None, None)

    async def test_another_users_process_is_not_inspected(self, proc: FakeProc) -> None:
        """A client of another uid (root may connect) gets the ranking, its /proc untouched."""
        proc.add(150, 1, owner="other", env={"SSH_AUTH_SOCK": LEGACY.a})
        decision = await decide(proc, 150, *backends(LEGACY))
        assert outcome(decision) == ("rank", None, None, None)
        assert "not yours" in decision.steps[-1]

    async def test_an_unreadable_process_gets_the_ranking(self, proc: FakeProc) -> None:
        """A client whose environment cannot be read (it exited) gets the ranking."""
        proc.add(150, 101, environ_readable=False)
        decision = await decide(proc, 150, *backends(LEGACY))
        assert outcome(decision) == ("rank", None, None, None)

    async def test_a_reused_parent_pid_is_not_followed(self, proc: FakeProc) -> None:
        """A newer process holding the login shell's old pid does not lend its session."""
        two_sessions(proc, LEGACY)
        proc.add(400, 201, start=B_LOGIN - 5)  # "child" of B's shell, started before it
        decision = await decide(proc, 400, *backends(LEGACY))
        assert outcome(decision) == ("rank", None, None, None)

    async def test_a_session_whose_agent_is_dead_gets_the_ranking(self, proc: FakeProc) -> None:
        two_sessions(proc, LEGACY)
        b, a = backends(LEGACY)
        decision = await decide(proc, 150, b, attrs.evolve(a, health=Health.DEAD))
        assert outcome(decision) == ("rank", None, None, None)

    async def test_a_slow_session_agent_still_counts(self, proc: FakeProc) -> None:
        """A slow agent (waiting for a touch) is usable, as for a pin."""
        two_sessions(proc, LEGACY)
        b, a = backends(LEGACY)
        decision = await decide(proc, 150, b, attrs.evolve(a, health=Health.SLOW))
        assert outcome(decision) == ("session", LEGACY.a, None, 100)

    async def test_screen_uses_the_session_it_descends_from(self, proc: FakeProc) -> None:
        """In screen, which has no activity query, the session named in the environment."""
        proc.add(600, 1, comm="screen", start=LATER, env={"SSH_AUTH_SOCK": LEGACY.a})
        proc.add(601, 600, start=LATER, env={"SSH_AUTH_SOCK": LEGACY.a, "STY": "600.pts-1.h"})
        decision = await decide(proc, 601, *backends(LEGACY))
        assert outcome(decision) == ("session", LEGACY.a, None, 100)
        assert any("screen" in step for step in decision.steps)

    async def test_a_path_spelled_differently_matches_by_inode(
        self, proc: FakeProc, tmp_path: Path
    ) -> None:
        """An environment naming the socket through a symlinked directory still matches."""
        real = tmp_path / "real"
        real.mkdir()
        (tmp_path / "link").symlink_to(real)
        socket_file = real / "s.hosthash00.sshd.aaaaaaaaaa"
        socket_file.touch()
        st = socket_file.stat()
        a = attrs.evolve(backend(str(socket_file)), dev=st.st_dev, ino=st.st_ino)
        spelled = str(tmp_path / "link" / socket_file.name)
        proc.add(101, 1, start=A_LOGIN, env={"SSH_AUTH_SOCK": spelled})
        decision = await decide(proc, 101, backend("/tmp/ssh-BBBBBBBBBB/agent.200"), a)
        assert outcome(decision)[:2] == ("session", a.path)


class TestTmux:
    @pytest.mark.parametrize("layout", [LEGACY, AGENT_DIR], ids=["before-10.1", "10.1"])
    async def test_the_most_recently_active_client_decides(
        self, proc: FakeProc, layout: Layout
    ) -> None:
        """After typing in client B, a pane's client gets B's agent; after A, A's."""
        two_sessions(proc, layout)
        tmux_from_a(proc, layout)
        b_typed = tmux_says(proc, (160, "/dev/pts/1", 100, "$0"), (260, "/dev/pts/3", 200, "$0"))
        decision = await decide(proc, 550, *backends(layout), tmux=Tmux(b_typed))
        assert outcome(decision) == ("tmux_client", layout.b, "/dev/pts/3", 200)
        a_typed = tmux_says(proc, (160, "/dev/pts/1", 300, "$0"), (260, "/dev/pts/3", 200, "$0"))
        decision = await decide(proc, 550, *backends(layout), tmux=Tmux(a_typed))
        assert outcome(decision) == ("tmux_client", layout.a, "/dev/pts/1", 100)

    async def test_clients_of_the_panes_own_session_come_first(self, proc: FakeProc) -> None:
        """A client showing another tmux session is ignored, however recent."""
        two_sessions(proc, LEGACY)
        tmux_from_a(proc, LEGACY)
        said = tmux_says(proc, (160, "/dev/pts/1", 100, "$0"), (260, "/dev/pts/3", 900, "$1"))
        decision = await decide(proc, 550, *backends(LEGACY), tmux=Tmux(said))
        assert outcome(decision) == ("tmux_client", LEGACY.a, "/dev/pts/1", 100)

    async def test_with_nobody_on_the_panes_session_every_client_counts(
        self, proc: FakeProc
    ) -> None:
        two_sessions(proc, LEGACY)
        tmux_from_a(proc, LEGACY)
        said = tmux_says(proc, (160, "/dev/pts/1", 100, "$1"), (260, "/dev/pts/3", 900, "$1"))
        decision = await decide(proc, 550, *backends(LEGACY), tmux=Tmux(said))
        assert outcome(decision) == ("tmux_client", LEGACY.b, "/dev/pts/3", 200)

    async def test_a_tie_goes_to_the_better_ranked_agent(self, proc: FakeProc) -> None:
        """Activity has one-second resolution; equal seconds fall back to the ranking's order."""
        two_sessions(proc, LEGACY)
        tmux_from_a(proc, LEGACY)
        said = tmux_says(proc, (160, "/dev/pts/1", 500, "$0"), (260, "/dev/pts/3", 500, "$0"))
        decision = await decide(proc, 550, *backends(LEGACY), tmux=Tmux(said))
        assert outcome(decision) == ("tmux_client", LEGACY.b, "/dev/pts/3", 200)

    @pytest.mark.parametrize("tmux", [Tmux(None), Tmux(hang=True)], ids=["fails", "hangs"])
    async def test_a_tmux_that_does_not_answer_gives_the_ranking(
        self, proc: FakeProc, tmux: Tmux
    ) -> None:
        """No answer from tmux: rule 3, never the session that started the tmux server."""
        two_sessions(proc, LEGACY)
        tmux_from_a(proc, LEGACY)
        decision = await decide(proc, 550, *backends(LEGACY), tmux=tmux)
        assert outcome(decision) == ("rank", None, None, None)
        assert "did not answer" in decision.steps[-1]

    async def test_a_reused_tmux_client_pid_is_not_believed(self, proc: FakeProc) -> None:
        """A process that started after tmux created the client is not that client."""
        two_sessions(proc, LEGACY)
        tmux_from_a(proc, LEGACY)
        said = tmux_says(proc, (250, "/dev/pts/3", 900, "$0"))  # 250 is ssh-add, not a client
        decision = await decide(proc, 550, *backends(LEGACY), tmux=Tmux(said))
        assert outcome(decision) == ("rank", None, None, None)
        # Client 260 started (B_LOGIN + 10 ticks) seconds after this client_created.
        late = f"c 900 {int(proc.epoch(TMUX_START))} 260 $0 /dev/pts/3\n".encode()
        decision = await decide(proc, 550, *backends(LEGACY), tmux=Tmux(late))
        assert outcome(decision) == ("rank", None, None, None)

    async def test_inside_tmux_without_a_tmux_variable(self, proc: FakeProc) -> None:
        """A pane process that dropped TMUX cannot say which server: the ranking."""
        two_sessions(proc, LEGACY)
        proc.add(500, 1, comm="tmux: server", start=TMUX_START, env={"SSH_AUTH_SOCK": LEGACY.a})
        proc.add(501, 500, start=TMUX_START, env={"SSH_AUTH_SOCK": LEGACY.a})
        decision = await decide(proc, 501, *backends(LEGACY))
        assert outcome(decision) == ("rank", None, None, None)


class TestRememberedDecisions:
    """A client process's decision is reused for its next connections, for a short while."""

    @pytest.mark.parametrize(
        ("lifetime", "fresh", "new_version", "expected"),
        [
            (3600.0, False, False, "session"),  # within the lifetime: remembered
            (0.0, False, False, "rank"),  # expired: read again
            (3600.0, True, False, "rank"),  # `ctl why` asks afresh
            (3600.0, False, True, "rank"),  # the registry changed: read again
        ],
        ids=["remembered", "expired", "fresh", "registry-changed"],
    )
    async def test_a_second_connection_reads_proc_only_when_it_must(
        self, proc: FakeProc, lifetime: float, fresh: bool, new_version: bool, expected: str
    ) -> None:
        """After the first decision the client's /proc entry vanishes: a remembered
        decision still names its session; one read again finds the process gone."""
        two_sessions(proc, LEGACY)
        chooser = attrs.evolve(affinity(proc), lifetime=lifetime)
        first_snapshot = snapshot(*backends(LEGACY))
        with trio.fail_after(10):
            first = await chooser.decide(150, first_snapshot)
            shutil.rmtree(proc.root / "150")
            later = attrs.evolve(first_snapshot, version=2) if new_version else first_snapshot
            second = await chooser.decide(150, later, fresh=fresh)
        assert (first.chosen_by.value, second.chosen_by.value) == ("session", expected)


class TestWhenTheLookupRuns:
    async def test_a_pin_beats_everything(self, proc: FakeProc) -> None:
        """A usable pin is the answer, without looking at processes at all."""
        b, a = backends(LEGACY)
        decision = await affinity(proc).decide(150, snapshot(b, a, pinned=a.id))
        assert outcome(decision) == ("pin", LEGACY.a, None, None)

    async def test_one_usable_agent_needs_no_lookup(self, proc: FakeProc) -> None:
        """With one usable agent the answer cannot change: no /proc read, no tmux."""
        tmux = Tmux(b"")
        b, a = backends(LEGACY)
        single = snapshot(b, attrs.evolve(a, health=Health.UNKNOWN))
        decision = await affinity(proc, tmux).decide(550, single)
        assert (outcome(decision), tmux.calls) == (("rank", None, None, None), 0)
        assert decision.steps == ("fewer than two usable agents: the ranking decides",)

    async def test_log_fields_name_the_client_and_the_sshd(self) -> None:
        b, _ = backends(LEGACY)
        decision = Decision(ChosenBy.TMUX_CLIENT, b, tmux_client="/dev/pts/3", sshd_pid=200)
        assert decision.log_fields() == {
            "chosen_by": "tmux_client",
            "tmux_client": "/dev/pts/3",
            "session_sshd_pid": 200,
        }


def test_match_session_stops_at_a_tmux_server(proc: FakeProc) -> None:
    """Beyond a tmux server lies the session that started it, never a pane's session."""
    tmux_from_a(proc, LEGACY)
    chain = ProcessTable(uid=proc.uid, root=str(proc.root)).chain(500)
    assert match_session(chain, backends(LEGACY)) is None


async def test_an_agent_named_for_pid_one_is_nobodys_session(proc: FakeProc) -> None:
    """agent.1 names no sshd: a process adopted by init is not in that session."""
    proc.add(101, 1, start=A_LOGIN)
    one, other = backend("/tmp/ssh-AAAAAAAAAA/agent.1"), backend("/tmp/ssh-BBBBBBBBBB/agent.7")
    decision = await decide(proc, 101, other, one)
    assert outcome(decision) == ("rank", None, None, None)


class TestEdges:
    async def test_a_session_agent_that_is_not_usable_among_three(self, proc: FakeProc) -> None:
        """With two other agents usable, a session whose own agent is dead gets the ranking."""
        two_sessions(proc, LEGACY)
        b, a = backends(LEGACY)
        third = backend("/tmp/ssh-CCCCCCCCCC/agent.300", appeared=3.0)
        decision = await decide(proc, 150, third, b, attrs.evolve(a, health=Health.DEAD))
        assert outcome(decision) == ("rank", None, None, None)
        assert decision.steps[-1] == "that agent is not usable: the ranking decides"

    async def test_a_tmux_server_with_no_client_at_all(self, proc: FakeProc) -> None:
        """A detached tmux (nobody attached anywhere): the ranking, as today."""
        two_sessions(proc, LEGACY)
        tmux_from_a(proc, LEGACY)
        decision = await decide(proc, 550, *backends(LEGACY), tmux=Tmux(tmux_says(proc)))
        assert outcome(decision) == ("rank", None, None, None)
        assert decision.steps[-1] == "no tmux client at all: the ranking decides"

    async def test_a_lookup_that_takes_too_long_gives_the_ranking(self, proc: FakeProc) -> None:
        """The whole lookup is bounded too, whatever part of it stalls."""
        two_sessions(proc, LEGACY)
        tmux_from_a(proc, LEGACY)
        query = TmuxQuery(run=Tmux(hang=True), timeout=60)
        slow = Affinity(ProcessTable(uid=proc.uid, root=str(proc.root)), query, timeout=0.05)
        with trio.fail_after(10):
            decision = await slow.decide(550, snapshot(*backends(LEGACY)))
        assert outcome(decision) == ("rank", None, None, None)
        assert decision.steps[-1] == "the lookup took too long: the ranking decides"
