"""The user's long-lived processes, each read from /proc once while it lives.

A client's ancestors (its shell, a tmux server, the shells sshd started)
outlive many clients, and what affinity needs of them does not change: the
environment a process started with and its start time. So each ancestor
is read once and remembered with its ``/proc/PID`` descriptor held open.
That descriptor stands for one process, not for a number: once the process
exits, its directory is empty, even if the pid has been given to another
process since. Using a remembered entry costs one system call that asks
the directory whether its process still runs, and is still ours or still
not ours; a pid reused by a new process is read afresh.

The client itself is read afresh every time (each ``ssh`` is a new
process), with the descriptor closed afterwards.

What a remembered entry does not follow: a parent that changed because
the original one exited (the orphan is adopted by pid 1 or a subreaper).
The walk then finds the old parent gone and stops there, as the lookup
would have a moment earlier; ``ctl why`` reads everything afresh.

Entries are looked up and added under a lock: the walk runs on the event
loop when it is short and in a worker thread when it is not.
"""

from __future__ import annotations

import os
import threading
import weakref

import attrs
import trio

from switcher.core._proctree import Chain, Process, ProcessTable, Stop

# Processes remembered at most, each holding one descriptor: a user's shells,
# tmux servers and login sessions are a few dozen. When full, entries whose
# process exited go first, then the oldest half.
KNOWN_MAX = 128

# How many processes a lookup reads from /proc on the event loop; a walk that
# needs more goes to a worker thread (about 60 us for the trip, more than a
# read). Usually that is the client itself and perhaps one new ancestor: a
# few system calls each, in memory; reading an environment takes the
# process's memory-map lock, which a client waiting for our answer holds
# only briefly.
INLINE_READS = 2

_UNKNOWN = object()  # not remembered (a remembered entry may be None: "not ours")


def _close_all(entries: dict[int, tuple[Process | None, int]]) -> None:
    for _process, dir_fd in entries.values():
        os.close(dir_fd)
    entries.clear()


@attrs.define(eq=False)
class KnownProcesses:
    """Ancestors read before, by pid, each checked to be the same process when used."""

    table: ProcessTable
    limit: int = KNOWN_MAX
    # pid -> (the process, or None for one that is not ours; its /proc/PID descriptor)
    _entries: dict[int, tuple[Process | None, int]] = attrs.Factory(dict)
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    def __attrs_post_init__(self) -> None:
        # The descriptors are closed when this object goes, whoever forgets it.
        weakref.finalize(self, _close_all, self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            _close_all(self._entries)

    def _lookup(self, pid: int) -> object:
        """The remembered entry for ``pid`` if its process still runs, else ``_UNKNOWN``."""
        with self._lock:
            entry = self._entries.get(pid)
            if entry is None:
                return _UNKNOWN
            process, dir_fd = entry
            if self.table.alive(dir_fd, ours=process is not None):
                return process
            del self._entries[pid]
            os.close(dir_fd)
            return _UNKNOWN

    def _read(self, pid: int) -> object:
        """Read ``pid`` afresh and remember it: the process, None if not ours, else ``_UNKNOWN``."""
        opened = self.table.read_keeping(pid)
        if opened is None:
            return _UNKNOWN  # gone, or unreadable: nothing to remember
        process, dir_fd = opened
        with self._lock:
            if pid in self._entries:  # another walk remembered it meanwhile
                os.close(dir_fd)
            else:
                if len(self._entries) >= self.limit:
                    self._make_room()
                self._entries[pid] = (process, dir_fd)
        return process

    def _make_room(self) -> None:
        for pid, (process, dir_fd) in list(self._entries.items()):
            if not self.table.alive(dir_fd, ours=process is not None):
                del self._entries[pid]
                os.close(dir_fd)
        if len(self._entries) >= self.limit:
            for pid in list(self._entries)[: max(1, len(self._entries) // 2)]:
                os.close(self._entries.pop(pid)[1])

    async def ancestry(self, pid: int) -> Chain:
        """``pid``'s ancestry: on the event loop when it takes few reads, else in a thread."""
        chain = self.chain_within(pid, INLINE_READS)
        if chain is not None:
            return chain
        return await trio.to_thread.run_sync(self.chain, pid, abandon_on_cancel=True)

    def chain(self, pid: int) -> Chain:
        """``ProcessTable.chain`` with remembered ancestors; the client is read afresh."""
        chain = self.chain_within(pid, None)
        assert chain is not None  # no limit on reads
        return chain

    def chain_within(self, pid: int, reads: int | None) -> Chain | None:
        """``chain``, or None once it would read more than ``reads`` processes."""
        done = 1  # the client itself, which the walk reads afresh

        def parent(ppid: int) -> Process | Stop | None:
            nonlocal done
            found = self._lookup(ppid)
            if found is _UNKNOWN:
                if reads is not None and done >= reads:
                    return None
                done += 1
                found = self._read(ppid)
                if found is _UNKNOWN:
                    return self.table.absent(ppid)
            if found is None:
                return Stop.NOT_OURS
            assert isinstance(found, Process)
            return found

        return self.table.walk(pid, parent)
