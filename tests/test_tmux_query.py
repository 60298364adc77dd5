"""Asking tmux for its clients: parsing, coalescing, the cache, the timeout, and real tmux."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from switcher.core._tmux import TmuxClient, TmuxQuery, TmuxView, argv, parse

OUTPUT = (
    b"c 1700000100 1700000000 160 $0 /dev/pts/1\n"
    b"c 1700000200 1700000050 260 $1 /dev/pts/3\n"
    b"p %0 501 $0\n"
    b"p %4 777 $1\n"
)


class TestParse:
    def test_clients_and_panes(self) -> None:
        """Each client line becomes a client, each pane line maps a pane to its session."""
        assert parse(OUTPUT) == TmuxView(
            clients=(
                TmuxClient("/dev/pts/1", 160, 1700000100, 1700000000, "$0"),
                TmuxClient("/dev/pts/3", 260, 1700000200, 1700000050, "$1"),
            ),
            pane_sessions_by_id=(("%0", "$0"), ("%4", "$1")),
            pane_sessions_by_pid=((501, "$0"), (777, "$1")),
        )

    def test_lines_that_do_not_parse_are_skipped(self) -> None:
        assert parse(b"c x y z $0 /dev/pts/1\nnonsense\np %1\n\n") == TmuxView((), (), ())

    def test_pane_session_by_pid_first_then_by_id(self) -> None:
        view = parse(OUTPUT)
        assert view.session_of_pane(pane_pids=(777,), pane_id="%0") == "$1"
        assert view.session_of_pane(pane_pids=(), pane_id="%0") == "$0"
        assert view.session_of_pane(pane_pids=(5,), pane_id="%9") is None


class FakeTmux:
    """A tmux runner that counts calls and answers when told to."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = trio.Event()
        self.hang = False

    async def __call__(self, command: Sequence[str]) -> bytes | None:
        self.calls.append(list(command))
        if self.hang:
            await trio.sleep_forever()
        await self.release.wait()
        return OUTPUT


class TestQuery:
    async def test_a_burst_shares_one_query(self, autojump_clock: trio.testing.MockClock) -> None:
        """Ten lookups arriving together run tmux once and all get its answer."""
        del autojump_clock
        fake = FakeTmux()
        query = TmuxQuery(run=fake)
        answers: list[TmuxView | None] = []

        async def ask() -> None:
            answers.append(await query.view("/tmp/tmux-1/default"))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            fake.release.set()
        assert (len(fake.calls), answers) == (1, [parse(OUTPUT)] * 10)
        assert fake.calls[0] == argv("/tmp/tmux-1/default")

    async def test_answer_is_reused_briefly_then_asked_again(
        self, autojump_clock: trio.testing.MockClock
    ) -> None:
        """Within its lifetime an answer is reused; after it, or when fresh, tmux runs again."""
        del autojump_clock
        fake = FakeTmux()
        fake.release.set()
        query = TmuxQuery(run=fake, lifetime=0.25)
        await query.view("/s")
        await trio.sleep(0.2)
        await query.view("/s")
        assert len(fake.calls) == 1
        await query.view("/s", fresh=True)
        assert len(fake.calls) == 2
        await trio.sleep(0.25)
        await query.view("/s")
        assert (len(fake.calls), query.queries) == (3, 3)

    async def test_a_tmux_that_does_not_answer_gives_none(
        self, autojump_clock: trio.testing.MockClock
    ) -> None:
        """A wedged server costs one timeout; the failure is cached like an answer."""
        del autojump_clock
        fake = FakeTmux()
        fake.hang = True
        query = TmuxQuery(run=fake, timeout=1.0)
        assert await query.view("/s") is None
        assert await query.view("/s") is None
        assert len(fake.calls) == 1

    async def test_a_cancelled_asker_leaves_no_failure_behind(
        self, autojump_clock: trio.testing.MockClock
    ) -> None:
        """If the caller that ran tmux is cancelled, the next caller asks again."""
        del autojump_clock
        fake = FakeTmux()
        query = TmuxQuery(run=fake)
        with trio.move_on_after(0.1):
            await query.view("/s")
        fake.release.set()
        assert await query.view("/s") == parse(OUTPUT)
        assert len(fake.calls) == 2


@pytest.fixture
def tmux_server() -> Iterator[Path]:
    """A real tmux server on a short private socket, with one detached session."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    directory = Path(f"/tmp/sw-tq-{os.getpid()}")
    directory.mkdir(mode=0o700)
    socket = directory / "s"
    subprocess.run(
        ["tmux", "-S", str(socket), "-f", "/dev/null", "new-session", "-d", "-s", "w", "cat"],
        check=True,
        timeout=30,
    )
    try:
        yield socket
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], check=False, timeout=30)
        shutil.rmtree(directory, ignore_errors=True)


class TestRealTmux:
    async def test_lists_the_panes_of_a_real_server(self, tmux_server: Path) -> None:
        """Real tmux understands the query: one pane in session $0, and no client attached."""
        with trio.fail_after(30):
            view = await TmuxQuery().view(str(tmux_server))
        assert view is not None
        assert (view.clients, [s for _, s in view.pane_sessions_by_id]) == ((), ["$0"])

    async def test_no_server_at_the_socket_gives_none(self, tmp_path: Path) -> None:
        with trio.fail_after(30):
            assert await TmuxQuery().view(str(tmp_path / "none")) is None
