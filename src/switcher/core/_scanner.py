"""One task owns scanning the agents dirs; everyone else asks it.

Scans are asked for by the probe cycle, the directory watch, the relay when
it runs out of agents, SIGHUP and ``ctl refresh``, often several at once.
If each ran its own scan, a slow scan that began before a session appeared
could finish after a quicker one that found it, and take it out of the
registry again. So one task scans, one scan at a time, and applies each
result before starting the next: results apply in the order the scans
began. A request made while a scan runs is served by the next scan (which
begins after the request, so it sees everything the requester saw), and
all requests made meanwhile share that one scan: a burst of ten requests
costs one or two scans.

The scan itself runs in a worker thread (see :func:`scan_in_thread`): a
crowded /tmp or an NFS home must not stall the relay.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import structlog
import trio

from switcher.core._backend import Backend, Reconciled
from switcher.core._discovery import ScanResult, ScanSettings, scan
from switcher.core._registry import Registry

log = structlog.get_logger()


async def scan_in_thread(settings: ScanSettings) -> ScanResult:
    """Scan in a worker thread: a crowded /tmp or an NFS home must not stall the relay."""
    return await trio.to_thread.run_sync(scan, settings)


# How the scanner looks at the agents dirs: real file-system work in a
# thread by default; tests script it in virtual time.
ScanFunction = Callable[[ScanSettings], Awaitable[ScanResult]]


def _ignore(result: ScanResult, reconciled: Reconciled) -> None:
    pass


@attrs.define(eq=False)
class _Request:
    """One caller waiting for a scan that begins after it asked."""

    generation: int
    done: trio.Event = attrs.Factory(trio.Event)
    added: dict[str, Backend] = attrs.Factory(dict)
    removed: dict[str, Backend] = attrs.Factory(dict)

    def merge(self, reconciled: Reconciled) -> None:
        """Fold in what one scan changed: the net change since the request."""
        for backend in reconciled.removed:
            if self.added.pop(backend.id, None) is None:
                self.removed[backend.id] = backend
        for backend in reconciled.added:
            self.added[backend.id] = backend

    def reconciled(self) -> Reconciled:
        return Reconciled(tuple(self.added.values()), tuple(self.removed.values()))


@attrs.define(eq=False)
class Scanner:
    """The one task that scans the agents dirs and applies what it finds to the registry.

    ``on_scanned`` hears about every applied scan (the prober probes what is
    new; the watcher follows the directories looked into); it must not block.
    """

    registry: Registry
    settings: ScanSettings
    scan_dirs: ScanFunction = scan_in_thread
    on_scanned: Callable[[ScanResult, Reconciled], None] = _ignore
    # Requests so far, and the request count the last applied scan covered.
    _asked: int = 0
    _covered: int = 0
    _wake: trio.Event = attrs.Factory(trio.Event)
    _waiting: list[_Request] = attrs.Factory(list)
    _reported_skips: frozenset[str] = frozenset()
    _reported_errors: frozenset[str] = frozenset()

    def request(self) -> int:
        """Ask for a scan that begins after now, without waiting for it."""
        self._asked += 1
        self._wake.set()
        return self._asked

    async def scan(self) -> Reconciled:
        """Ask for a scan and wait until it is applied; return what changed meanwhile.

        The result covers every scan applied between the request and the
        one that serves it, so a caller learns of each session that came or
        went since it asked, whichever scan noticed.
        """
        request = _Request(self.request())
        self._waiting.append(request)
        try:
            await request.done.wait()
        finally:
            if not request.done.is_set():
                self._waiting.remove(request)
        return request.reconciled()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Scan once, report ready, then scan whenever asked, until cancelled."""
        await self._scan_once(self._asked)
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._asked > self._covered:
                await self._scan_once(self._asked)

    async def _scan_once(self, covers: int) -> None:
        result = await self.scan_dirs(self.settings)
        self._log_scan(result)
        reconciled = self.registry.reconcile(result.candidates)
        self._covered = covers
        still_waiting = []
        for request in self._waiting:
            request.merge(reconciled)
            if request.generation <= covers:
                request.done.set()
            else:
                still_waiting.append(request)
        self._waiting = still_waiting
        self.on_scanned(result, reconciled)

    def _log_scan(self, result: ScanResult) -> None:
        # Skips are debug-only, and only when first seen: a shared /tmp must
        # not produce a log line per entry per scan.
        for item in result.skipped:
            if item.path not in self._reported_skips:
                log.debug("switcher.discovery.skipped", path=item.path, reason=item.reason)
        self._reported_skips = frozenset(s.path for s in result.skipped)
        for item in result.errors:
            if item.path not in self._reported_errors:
                log.warning("switcher.discovery.dir_unreadable", path=item.path, reason=item.reason)
        self._reported_errors = frozenset(e.path for e in result.errors)
