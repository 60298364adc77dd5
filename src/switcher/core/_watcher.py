"""Hearing that directory entries came or went, from inotify, without polling.

Several owners share one inotify descriptor: the prober follows the agents
dirs and the session dirs in them, the daemon follows its own sockets. Each
owner names the directories it cares about and, for each, the prefixes of
the entry names that matter (``ssh-`` and ``s.`` in an agents dir, ``agent.``
in a session dir); everything else that happens there (a busy /tmp) is
dropped after a prefix test, without waking the owner.

A directory that does not exist yet (``~/.ssh/agent`` before the first
OpenSSH 10.1 login) is watched through its nearest existing ancestor, for
the one name on the way to it; when that appears, or a watched directory is
removed or moved, the watches are worked out again. An owner is told (its
``on_change`` is called) whenever an entry that matters came or went, and
also right after a new watch starts, since entries may have come between
its last look and the watch.

A directory that cannot be watched (inotify unavailable, its limits
reached) is polled instead: the owner is told on every :meth:`Watcher.poll`,
which the probe cycle calls, so it is looked at once per probe interval.
That is logged once per directory.

Adding and removing watches resolves paths, so it runs in a worker thread
like every other file-system call; reading events is non-blocking and runs
on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable, Iterable, Iterator

import attrs
import inotify_simple
import structlog
import trio

log = structlog.get_logger()


# Entry events that matter: something was created, deleted or moved in or
# out. Not IN_ATTRIB, IN_MODIFY or IN_OPEN: /tmp is busy with those all day.
_F = inotify_simple.flags
_MASK = (
    _F.CREATE | _F.DELETE | _F.MOVED_FROM | _F.MOVED_TO | _F.DELETE_SELF | _F.MOVE_SELF | _F.ONLYDIR
)
# The watched directory itself went away (or its watch did).
_GONE = _F.DELETE_SELF | _F.MOVE_SELF | _F.UNMOUNT | _F.IGNORED

_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len
# A read takes whatever is queued, up to this much (about 1,000 events).
_READ_SIZE = 64 * 1024

# After a batch of events, wait this long before reading again: a busy
# /tmp then costs at most 20 reads a second, however busy it is, and a new
# session is still noticed well within a second.
DEFAULT_SETTLE = 0.05


@attrs.frozen
class Interest:
    """A directory whose entries matter to an owner, and which names matter there."""

    path: str
    prefixes: tuple[str, ...]


@attrs.frozen
class _Target:
    """What is really watched for one interest: the directory, or the nearest ancestor."""

    directory: str
    prefixes: tuple[bytes, ...] = ()  # entries that matter here
    # Names on the way to interests that do not exist yet: when one comes or
    # goes, the watches are worked out again.
    children: frozenset[bytes] = frozenset()

    def merge(self, other: _Target) -> _Target:
        """One directory, two interests (say /tmp, and the way to a missing dir in it)."""
        return _Target(
            self.directory, self.prefixes + other.prefixes, self.children | other.children
        )


@attrs.define(eq=False)
class _Owner:
    on_change: Callable[[], None]
    interests: tuple[Interest, ...] = ()
    targets: dict[str, _Target] = attrs.Factory(dict)  # by directory
    polled: frozenset[str] = frozenset()  # interests' paths that are polled

    def polled_paths(self) -> list[str]:
        return [i.path for i in self.interests]


def _resolve(interest: Interest) -> _Target | None:
    """The directory to watch for ``interest``: itself, or its nearest existing ancestor."""
    path, child = os.path.abspath(interest.path), None
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path, child = parent, os.path.basename(path)
    if child is None:
        return _Target(path, prefixes=tuple(os.fsencode(p) for p in interest.prefixes))
    return _Target(path, children=frozenset({os.fsencode(child)}))


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "inotify watch limit reached (fs.inotify.max_user_watches)"
    if exc.errno == errno.EMFILE:
        return "inotify instance limit reached (fs.inotify.max_user_instances)"
    return exc.strerror or str(exc)


def _events(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(wd, mask, name) for each event in a read; names stay bytes (no decoding)."""
    offset = 0
    while offset < len(data):
        wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        yield wd, mask, data[offset : offset + length].rstrip(b"\0")
        offset += length


@attrs.define(eq=False)
class Watcher:
    """One inotify descriptor shared by the owners of directory interests.

    Make it with :meth:`open`, run :meth:`run` in a nursery, then owners
    call :meth:`follow`. Without inotify (``inotify=None``), everything is
    polled.
    """

    _inotify: inotify_simple.INotify | None
    settle: float = DEFAULT_SETTLE
    _owners: dict[str, _Owner] = attrs.Factory(dict)
    _wds: dict[str, int] = attrs.Factory(dict)  # watched directory -> wd
    _dirs: dict[int, set[str]] = attrs.Factory(dict)  # wd -> directories (one inode, many names)
    _stale: set[int] = attrs.Factory(set)  # watches to remove on the next apply
    _dirty: trio.Event = attrs.Factory(trio.Event)
    _reported: set[str] = attrs.Factory(set)

    @classmethod
    def open(cls, *, settle: float = DEFAULT_SETTLE) -> Watcher:
        """A watcher on a new inotify descriptor, or one that polls if there can be none."""
        try:
            return cls(inotify_simple.INotify(nonblocking=True), settle=settle)
        except OSError as exc:
            log.warning("switcher.watcher.unavailable", reason=_describe(exc))
            return cls(None, settle=settle)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()

    # -- owners ----------------------------------------------------------

    def follow(
        self, owner: str, interests: Iterable[Interest], on_change: Callable[[], None]
    ) -> None:
        """Make ``owner``'s interests exactly these; ``on_change`` hears of changes."""
        state = self._owners.setdefault(owner, _Owner(on_change))
        state.on_change = on_change
        interests = tuple(interests)
        if interests != state.interests:
            state.interests = interests
            self._dirty.set()

    def polling(self, owner: str) -> bool:
        """Whether any of ``owner``'s directories is polled rather than watched."""
        state = self._owners.get(owner)
        return self._inotify is None or (state is not None and bool(state.polled))

    def watching(self, path: str) -> bool:
        """Whether inotify watches ``path`` itself (not an ancestor waiting for it)."""
        return os.path.abspath(path) in self._wds

    def poll(self) -> None:
        """Tell every owner with a polled directory to look again (the probe cycle calls this)."""
        for owner in list(self._owners):
            if self.polling(owner):
                self._owners[owner].on_change()

    # -- the task ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the watches in line with the interests and dispatch events, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                if self._inotify is not None:
                    nursery.start_soon(self._read, self._inotify)
                task_status.started()
                while True:
                    await self._dirty.wait()
                    self._dirty = trio.Event()
                    await self._apply()
        finally:
            self.close()

    async def _apply(self) -> None:
        """Work out every owner's targets again, add and remove watches, tell who gained one."""
        owners = list(self._owners.items())
        if self._inotify is None:
            for _, state in owners:
                self._set_polled(
                    state, dict.fromkeys(state.polled_paths(), "inotify is unavailable")
                )
            return
        stale = set(self._stale)
        wanted, added, failed, again = await trio.to_thread.run_sync(
            self._resolve_and_watch, {owner: state.interests for owner, state in owners}, stale
        )
        self._stale -= stale
        if again:
            self._dirty.set()
        for directory in self._wds.keys() - _directories(wanted):
            wd = self._wds.pop(directory)
            self._dirs[wd].discard(directory)
            if not self._dirs[wd]:
                del self._dirs[wd]
        for directory, wd in added.items():
            self._wds[directory] = wd
            self._dirs.setdefault(wd, set()).add(directory)
        for owner, state in owners:
            before = state.targets
            state.targets = _by_directory(t for _, t in wanted[owner] if t is not None)
            self._set_polled(
                state,
                {
                    i.path: "no such directory" if t is None else failed[t.directory]
                    for i, t in wanted[owner]
                    if t is None or t.directory in failed
                },
            )
            if any(d in added or (d in self._wds and d not in before) for d in state.targets):
                # Entries may have come between the owner's last look and the watch.
                state.on_change()

    def _resolve_and_watch(
        self, interests: dict[str, tuple[Interest, ...]], stale: set[int]
    ) -> tuple[_Wanted, dict[str, int], dict[str, str], bool]:
        """In a worker thread: resolve the paths, make the watch syscalls; change no state."""
        assert self._inotify is not None
        wanted = {owner: [(i, _resolve(i)) for i in mine] for owner, mine in interests.items()}
        directories = _directories(wanted)
        for wd in stale:
            with contextlib.suppress(OSError):  # the kernel may have dropped it already
                self._inotify.rm_watch(wd)
        for directory in self._wds.keys() - directories:
            wd = self._wds[directory]
            if self._dirs.get(wd, set()) <= {directory}:
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(wd)
        added: dict[str, int] = {}
        failed: dict[str, str] = {}
        for directory in sorted(directories - self._wds.keys()):
            try:
                added[directory] = self._inotify.add_watch(directory, _MASK)
            except OSError as exc:
                failed[directory] = _describe(exc)
        # A directory made between resolving and watching its ancestor sends
        # the ancestor no event: look again, and work it out anew if so.
        again = any(_resolve(i) != t for pairs in wanted.values() for i, t in pairs)
        return wanted, added, failed, again

    def _forget(self, wd: int) -> None:
        """Drop a watch from the books (its directory went, or we no longer want it)."""
        for directory in self._dirs.pop(wd, set()):
            if self._wds.get(directory) == wd:
                del self._wds[directory]

    def _set_polled(self, state: _Owner, polled: dict[str, str]) -> None:
        state.polled = frozenset(polled)
        for path, reason in polled.items():
            if path not in self._reported:
                self._reported.add(path)
                log.warning("switcher.watcher.polling", path=path, reason=reason)
        self._reported -= {i.path for i in state.interests} - state.polled

    async def _read(self, inotify: inotify_simple.INotify) -> None:
        fd = inotify.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                continue
            self._dispatch(data)
            # Let a burst settle; see DEFAULT_SETTLE.
            await trio.sleep(self.settle)

    def _dispatch(self, data: bytes) -> None:
        told: set[str] = set()
        for wd, mask, name in _events(data):
            if mask & _F.Q_OVERFLOW:
                told.update(self._owners)  # events were lost: everyone looks again
                self._dirty.set()
                continue
            directories = self._dirs.get(wd)
            if not directories:
                continue  # a watch we removed, or one not recorded yet
            told.update(self._concerned(directories, mask, name))
            if mask & _GONE:
                # Work the watches out again: the directory may be back, or
                # gone for good (then its ancestor is watched for it).
                self._dirty.set()
                if mask & _F.MOVE_SELF:
                    self._stale.add(wd)  # it follows the moved directory now
                if mask & (_F.IGNORED | _F.MOVE_SELF):
                    self._forget(wd)
        for owner in told:
            self._owners[owner].on_change()

    def _concerned(self, directories: set[str], mask: int, name: bytes) -> Iterator[str]:
        """The owners an event in one of ``directories`` matters to."""
        for owner, state in self._owners.items():
            for directory in directories:
                target = state.targets.get(directory)
                if target is None:
                    continue
                if name in target.children:
                    self._dirty.set()  # the name on the way came or went
                if mask & _GONE or name in target.children or name.startswith(target.prefixes):
                    yield owner
                    break


_Wanted = dict[str, list[tuple[Interest, _Target | None]]]


def _by_directory(targets: Iterable[_Target]) -> dict[str, _Target]:
    merged: dict[str, _Target] = {}
    for target in targets:
        known = merged.get(target.directory)
        merged[target.directory] = target if known is None else known.merge(target)
    return merged


def _directories(wanted: _Wanted) -> set[str]:
    return {t.directory for pairs in wanted.values() for _, t in pairs if t is not None}
