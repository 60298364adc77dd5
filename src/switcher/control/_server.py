"""The control server: the protocol's thin trio adapter over the registry."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from switcher import __version__
from switcher.control._commands import choice_id, diff_events, list_reply, prefer, refresh_reply
from switcher.control._protocol import (
    MAX_LINE,
    Command,
    ControlError,
    LineFramer,
    ListCommand,
    PreferCommand,
    RefreshCommand,
    StatusCommand,
    WatchCommand,
    encode_reply,
    parse_request,
)
from switcher.core import Health, Prober, ProxyStatistics, Registry, peer_credentials
from switcher.core._accept import accept_loop
from switcher.core._peer import uid_allowed

log = structlog.get_logger()

# A control client that has not sent a whole request in this long is
# presumably stuck; it holds one of a bounded number of slots, so let it go.
IDLE_TIMEOUT = 30.0

# Control connections are a handful of CLI calls and maybe a status-line
# watcher; far more than that at once is a runaway script or an attack.
MAX_CONNECTIONS = 64


@attrs.frozen
class DaemonInfo:
    """Static facts for ``status``."""

    pid: int
    socket_path: Path
    control_path: Path
    agents_dirs: tuple[str, ...]
    started: float  # time.monotonic() at start-up


@attrs.define(eq=False)
class ControlService:
    registry: Registry
    prober: Prober
    info: DaemonInfo
    proxy_statistics: Callable[[], ProxyStatistics]
    idle_timeout: float = IDLE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    _active: int = 0

    def status(self) -> dict[str, Any]:
        snapshot = self.registry.snapshot()
        stats = self.proxy_statistics()
        return {
            "ok": True,
            "pid": self.info.pid,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.info.started, 3),
            "socket_path": str(self.info.socket_path),
            "control_path": str(self.info.control_path),
            "agents_dirs": list(self.info.agents_dirs),
            "backends": len(snapshot.backends),
            "healthy": sum(b.health is Health.HEALTHY for b in snapshot.backends),
            "pinned": snapshot.pinned,
            "choice": choice_id(snapshot),
            "connections": {
                "total": stats.total,
                "active": stats.active,
                "failovers": stats.failovers,
                "answered_locally": stats.answered_locally,
            },
        }

    async def execute(self, command: Command) -> dict[str, Any]:
        """Run one non-streaming command and build its reply."""
        if isinstance(command, ListCommand):
            return list_reply(self.registry.snapshot())
        if isinstance(command, PreferCommand):
            reply = prefer(self.registry, command.target)
            log.info("switcher.control.pin_changed", pinned=reply["pinned"])
            return reply
        if isinstance(command, RefreshCommand):
            report = await self.prober.refresh()
            return refresh_reply(report, self.registry.snapshot())
        if isinstance(command, StatusCommand):
            return self.status()
        raise AssertionError(f"not a one-shot command: {command}")  # pragma: no cover

    async def handle(self, stream: trio.abc.Stream) -> str:
        """Serve one control connection; return how it ended."""
        framer = LineFramer(MAX_LINE)
        while True:
            try:
                line = await self._read_line(stream, framer)
            except ControlError as error:
                await _send(stream, error.reply())
                return error.code
            if line is None:
                return "closed"
            try:
                command = parse_request(line)
            except ControlError as error:
                await _send(stream, error.reply())
                continue
            if isinstance(command, WatchCommand):
                await self._watch(stream)
                return "watch_ended"
            try:
                reply = await self.execute(command)
            except ControlError as error:
                reply = error.reply()
            await _send(stream, reply)

    async def _read_line(self, stream: trio.abc.Stream, framer: LineFramer) -> bytes | None:
        with trio.move_on_after(self.idle_timeout):
            while (line := framer.next_line()) is None:
                data = await stream.receive_some(MAX_LINE)
                if not data:
                    return None  # a half-sent line from a vanished client is dropped
                framer.feed(data)
            return line
        raise ControlError("idle_timeout", f"no request within {self.idle_timeout:g} s")

    async def _watch(self, stream: trio.abc.Stream) -> None:
        snapshot = self.registry.snapshot()
        await _send(stream, {"ok": True, "watching": True, "choice": choice_id(snapshot)})
        async with trio.open_nursery() as nursery:

            async def until_client_leaves() -> None:
                # Anything a watcher sends is ignored; its EOF ends the watch.
                while await stream.receive_some(MAX_LINE):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_client_leaves)
            while True:
                await self.registry.wait_changed(snapshot.version)
                new = self.registry.snapshot()
                for event in diff_events(snapshot, new):
                    await _send(stream, event)
                snapshot = new


async def _send(stream: trio.abc.Stream, reply: dict[str, Any]) -> None:
    await stream.send_all(encode_reply(reply))


async def serve_control(
    listener: trio.abc.Listener[trio.SocketStream],
    service: ControlService,
    *,
    task_status: trio.TaskStatus[ControlService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept control clients until cancelled."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                peer = peer_credentials(stream.socket)
            except OSError:
                return
            if not uid_allowed(peer.uid, os.getuid()):
                log.warning(
                    "switcher.control.peer_refused", client_pid=peer.pid, client_uid=peer.uid
                )
                return
            if service._active >= service.max_connections:  # noqa: SLF001
                log.warning("switcher.control.busy", client_pid=peer.pid)
                error = ControlError(
                    "busy", f"more than {service.max_connections} control connections"
                )
                await _quietly(_send(stream, error.reply()))
                return
            service._active += 1  # noqa: SLF001
            started = time.perf_counter()
            outcome = "error"
            try:
                outcome = await service.handle(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                outcome = "client_vanished"
            except Exception:
                log.exception("switcher.control.connection_crashed", client_pid=peer.pid)
            finally:
                service._active -= 1  # noqa: SLF001
                log.debug(
                    "switcher.control.connection_closed",
                    client_pid=peer.pid,
                    outcome=outcome,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                )

    async with listener, trio.open_nursery() as nursery:
        task_status.started(service)
        await accept_loop(listener, nursery, handle)


async def _quietly(send: Any) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await send
