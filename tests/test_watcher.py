"""The directory watcher on real directories with inotify, and its polling fallback."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import inotify_simple
import pytest
import structlog.testing
import trio
import trio.testing

from switcher.core import Interest, Watcher

# Every wait in these tests gives up after this long.
HANG_GUARD_S = 10

AGENTS = ("ssh-", "s.")
SESSION = ("agent.",)


@attrs.define(eq=False)
class Ear:
    """An owner's ``on_change``: counts what it heard and lets a test wait for the next."""

    heard: int = 0
    _news: trio.Event = attrs.Factory(trio.Event)

    def __call__(self) -> None:
        self.heard += 1
        self._news.set()

    async def next(self) -> None:
        """Wait until told (or return at once if told since the last wait)."""
        with trio.fail_after(HANG_GUARD_S):
            await self._news.wait()
        self._news = trio.Event()


@pytest.fixture
async def watcher() -> AsyncIterator[Watcher]:
    watcher = Watcher.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        yield watcher
        nursery.cancel_scope.cancel()


def make_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(path))


async def follow(watcher: Watcher, ear: Ear, *interests: Interest, owner: str = "test") -> None:
    """Follow ``interests`` and wait for the call every new watch brings."""
    watcher.follow(owner, interests, ear)
    await ear.next()


class TestSessions:
    async def test_a_session_appears_and_goes(self, watcher: Watcher, short_tmp: Path) -> None:
        """A new ssh-* dir in an agents dir, its socket, and their removal are each heard."""
        ear = Ear()
        await follow(watcher, ear, Interest(str(short_tmp), AGENTS))
        session = short_tmp / "ssh-AbCdEf1234"
        session.mkdir(mode=0o700)
        await ear.next()
        await follow(
            watcher, ear, Interest(str(short_tmp), AGENTS), Interest(str(session), SESSION)
        )
        make_socket(session / "agent.42")
        await ear.next()
        (session / "agent.42").unlink()
        await ear.next()
        session.rmdir()
        await ear.next()
        assert not watcher.polling("test")

    async def test_a_10_1_socket_appears(self, watcher: Watcher, short_tmp: Path) -> None:
        """An OpenSSH 10.1 socket made straight in the agents dir is heard."""
        ear = Ear()
        await follow(watcher, ear, Interest(str(short_tmp), AGENTS))
        make_socket(short_tmp / "s.abcdefghij.sshd.0123456789")
        await ear.next()

    async def test_other_names_are_not_heard(self, watcher: Watcher, short_tmp: Path) -> None:
        """Entries whose names cannot be agents (a busy /tmp) wake no owner."""
        ear, canary = Ear(), Ear()
        await follow(watcher, ear, Interest(str(short_tmp), AGENTS))
        watcher.follow("canary", [Interest(str(short_tmp), ("zz-",))], canary)
        await canary.next()
        heard = ear.heard
        for name in ("tmux-1000", "systemd-private-x", "agent.7", "sh-thing"):
            (short_tmp / name).mkdir()
        (short_tmp / "file.txt").write_bytes(b"x")
        (short_tmp / "file.txt").unlink()
        (short_tmp / "zz-last").mkdir()
        # Events arrive in order: once the canary hears its entry, the
        # others have been looked at, and none of them mattered.
        await canary.next()
        assert ear.heard == heard


class TestDirectoriesComeAndGo:
    async def test_a_directory_created_later(self, watcher: Watcher, short_tmp: Path) -> None:
        """~/.ssh/agent, missing with its parent at first, is heard of when it appears,
        and then watched itself."""
        home = short_tmp / "home"
        home.mkdir()
        agents = home / ".ssh" / "agent"
        ear = Ear()
        await follow(watcher, ear, Interest(str(agents), AGENTS))
        (home / ".ssh").mkdir(mode=0o700)
        await ear.next()
        agents.mkdir(mode=0o700)
        # Heard when it appears, then again once it is watched itself.
        while not watcher.watching(str(agents)):
            await ear.next()
        make_socket(agents / "s.abcdefghij.sshd.0123456789")
        await ear.next()

    async def test_a_directory_removed_and_made_again(
        self, watcher: Watcher, short_tmp: Path
    ) -> None:
        """An agents dir removed and re-created is heard both times and watched anew."""
        agents = short_tmp / "agents"
        agents.mkdir()
        ear = Ear()
        await follow(watcher, ear, Interest(str(agents), AGENTS))
        shutil.rmtree(agents)
        await ear.next()
        agents.mkdir()
        while not watcher.watching(str(agents)):
            await ear.next()
        make_socket(agents / "s.abcdefghij.sshd.0123456789")
        await ear.next()


class TestFallback:
    async def test_without_inotify_everything_is_polled(
        self, monkeypatch: pytest.MonkeyPatch, short_tmp: Path
    ) -> None:
        """No inotify at all (say, its instance limit reached): logged once; every
        owner is told at each poll, that is, once per probe cycle."""

        def refuse(*_args: object, **_kwargs: object) -> None:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        monkeypatch.setattr(inotify_simple, "INotify", refuse)
        with structlog.testing.capture_logs() as logs:
            watcher = Watcher.open()
        ear = Ear()
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)  # nothing to watch with: all polled
            watcher.follow("test", [Interest(str(short_tmp), AGENTS)], ear)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        watcher.poll()
        watcher.poll()
        assert (ear.heard, watcher.polling("test"), logs) == (
            2,
            True,
            [
                {
                    "event": "switcher.watcher.unavailable",
                    "log_level": "warning",
                    "reason": "inotify instance limit reached (fs.inotify.max_user_instances)",
                }
            ],
        )

    async def test_a_directory_that_cannot_be_watched_is_polled(
        self, monkeypatch: pytest.MonkeyPatch, watcher: Watcher, short_tmp: Path
    ) -> None:
        """A directory inotify refuses (its watch limit reached) is polled, logged once;
        the others stay watched."""
        refused = short_tmp / "refused"
        refused.mkdir()
        add_watch = inotify_simple.INotify.add_watch

        def limited(self: inotify_simple.INotify, path: str, mask: int) -> int:
            if path == str(refused):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return int(add_watch(self, path, mask))

        monkeypatch.setattr(inotify_simple.INotify, "add_watch", limited)
        ear, other = Ear(), Ear()
        with structlog.testing.capture_logs() as logs:
            watcher.follow("test", [Interest(str(refused), AGENTS)], ear)
            await follow(watcher, other, Interest(str(short_tmp), AGENTS), owner="other")
            watcher.follow("test", [Interest(str(refused), AGENTS)], ear)  # no second line
            watcher.poll()
            await ear.next()
        assert (watcher.polling("test"), watcher.polling("other"), logs) == (
            True,
            False,
            [
                {
                    "event": "switcher.watcher.polling",
                    "log_level": "warning",
                    "path": str(refused),
                    "reason": "inotify watch limit reached (fs.inotify.max_user_watches)",
                }
            ],
        )

    async def test_a_directory_moved_away(self, watcher: Watcher, short_tmp: Path) -> None:
        """A watched dir renamed away is heard; its watch no longer counts for the path,
        and a new dir at the path is watched."""
        agents = short_tmp / "agents"
        agents.mkdir()
        ear = Ear()
        await follow(watcher, ear, Interest(str(agents), AGENTS))
        agents.rename(short_tmp / "moved")
        await ear.next()
        agents.mkdir()
        while not watcher.watching(str(agents)):
            await ear.next()
        make_socket(agents / "s.abcdefghij.sshd.0123456789")
        await ear.next()
        make_socket(short_tmp / "moved" / "s.abcdefghij.sshd.9876543210")
        assert watcher.watching(str(agents))

    async def test_an_interest_dropped_is_unwatched(
        self, watcher: Watcher, short_tmp: Path
    ) -> None:
        """Directories an owner no longer names stop being watched."""
        session = short_tmp / "ssh-AbCdEf1234"
        session.mkdir()
        ear = Ear()
        await follow(
            watcher, ear, Interest(str(short_tmp), AGENTS), Interest(str(session), SESSION)
        )
        watcher.follow("test", [Interest(str(short_tmp), AGENTS)], ear)
        with trio.fail_after(HANG_GUARD_S):
            while watcher.watching(str(session)):  # the watches change in a worker thread
                await trio.testing.wait_all_tasks_blocked()
        assert watcher.watching(str(short_tmp))


class TestOverflow:
    async def test_lost_events_tell_every_owner(self, watcher: Watcher, short_tmp: Path) -> None:
        """When the kernel's queue overflowed, every owner looks again."""
        first, second = Ear(), Ear()
        await follow(watcher, first, Interest(str(short_tmp), AGENTS), owner="first")
        await follow(watcher, second, Interest(str(short_tmp), SESSION), owner="second")
        watcher._dispatch(struct.pack("iIII", -1, 0x4000, 0, 0))  # IN_Q_OVERFLOW
        await first.next()
        await second.next()
