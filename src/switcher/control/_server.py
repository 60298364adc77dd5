"""The control server: the protocol's thin trio adapter over the registry."""

from __future__ import annotations

import contextlib
import enum
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
    StopCommand,
    WatchCommand,
    WhyCommand,
    encode_reply,
    parse_request,
)
from switcher.control._sessions import why_reply, with_sessions
from switcher.core import (
    Affinity,
    Health,
    Prober,
    ProxyStatistics,
    Registry,
    Snapshot,
    accept_loop,
    peer_credentials,
    survey,
    uid_allowed,
    without_lookup,
)

log = structlog.get_logger()

# A control client that has not sent a whole request in this long is
# presumably stuck; it holds one of a bounded number of slots, so let it go.
IDLE_TIMEOUT = 30.0

# Control connections are a handful of CLI calls and maybe a status-line
# watcher; far more than that at once is a runaway script or an attack.
MAX_CONNECTIONS = 64


class Outcome(enum.Enum):
    """How a control connection ended: the closed set logged as its ``outcome``."""

    CLOSED = "closed"  # the client closed its side between requests
    WATCH_ENDED = "watch_ended"  # a watcher closed its side
    CLIENT_VANISHED = "client_vanished"  # the connection broke under us (reason: how)
    IDLE_TIMEOUT = "idle_timeout"  # no whole request in time (an error reply was sent)
    LINE_TOO_LONG = "line_too_long"  # a request line over the limit (an error reply was sent)
    STOPPED = "stopped"  # the daemon stopped while the connection was open
    CRASHED = "crashed"  # a bug in switcher; logged with its traceback


@attrs.frozen
class Ending:
    """An outcome, and free text saying more when there is more to say."""

    outcome: Outcome
    reason: str | None = None


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
    # Starts the daemon's graceful stop (what SIGTERM does); returns at once.
    request_stop: Callable[[], None]
    idle_timeout: float = IDLE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    # Session affinity's process and tmux view, for `why` and the sessions in
    # `list` (None: neither is shown); whether the relay uses it is
    # `affinity_on` (--affinity).
    affinity: Affinity | None = None
    affinity_on: bool = False
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
            "affinity": self.affinity_on,
            "connections": {
                "total": stats.total,
                "active": stats.active,
                "failovers": stats.failovers,
                "answered_locally": stats.answered_locally,
            },
        }

    def stop_reply(self) -> dict[str, Any]:
        return {
            "ok": True,
            "stopping": True,
            "pid": self.info.pid,
            "socket_path": str(self.info.socket_path),
            "control_path": str(self.info.control_path),
        }

    async def execute(self, command: Command) -> dict[str, Any]:
        """Run one non-streaming command and build its reply."""
        if isinstance(command, ListCommand):
            return await self._list()
        if isinstance(command, WhyCommand):
            return await self._why(command.pid)
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

    async def _list(self) -> dict[str, Any]:
        snapshot = self.registry.snapshot()
        reply = list_reply(snapshot)
        if self.affinity is None:
            return reply
        # Who each agent serves is a courtesy: a slow /proc or tmux costs it, not the list.
        with trio.move_on_after(self.affinity.timeout):
            served = await survey(self.affinity.processes, self.affinity.tmux, snapshot)
            return with_sessions(reply, served)
        return reply

    async def _why(self, pid: int) -> dict[str, Any]:
        if self.affinity is None:
            raise ControlError("unavailable", "this daemon cannot look at processes")
        snapshot = self.registry.snapshot()
        if self.affinity_on:
            # Fresh from tmux: whoever asks has just typed, and wants that to count.
            decision = await self.affinity.decide(pid, snapshot, fresh=True)
        else:
            decision = without_lookup(snapshot)
        return why_reply(pid, decision, snapshot, affinity=self.affinity_on)

    async def serve_client(self, stream: trio.SocketStream) -> None:
        """Check who connected, serve them, and log how it ended; close ``stream`` after."""
        async with stream:
            try:
                peer = peer_credentials(stream.socket)
            except OSError:
                return  # gone before we could ask who it was: nothing was said, nothing to log
            # Every event about this connection says who it was (this task's context only).
            structlog.contextvars.bind_contextvars(client_pid=peer.pid, client_uid=peer.uid)
            if not uid_allowed(peer.uid, os.getuid()):
                log.warning("switcher.control.peer_refused")
                return
            if self._active >= self.max_connections:
                log.warning("switcher.control.busy")
                error = ControlError(
                    "busy", f"more than {self.max_connections} control connections"
                )
                with contextlib.suppress(trio.BrokenResourceError):
                    await _send(stream, error.reply())
                return
            self._active += 1
            started = time.perf_counter()
            # Only cancellation (the daemon stopping) leaves this value in place.
            ending = Ending(Outcome.STOPPED)
            try:
                ending = await self.handle(stream)
            except Exception:
                # Log and go on, by design: a bug met by one control client must
                # not take down the daemon, and the traceback shows what it was.
                # Everything a client can do (vanish, send garbage, stall) is
                # handled in handle() and never gets here.
                ending = Ending(Outcome.CRASHED)
                log.exception("switcher.control.connection_crashed")
            finally:
                self._active -= 1
                log.debug(
                    "switcher.control.connection_closed",
                    outcome=ending.outcome.value,
                    reason=ending.reason,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                )

    async def handle(self, stream: trio.abc.Stream) -> Ending:
        """Serve one control connection's requests; say how it ended."""
        try:
            return await self._converse(stream)
        except trio.BrokenResourceError as exc:
            return Ending(Outcome.CLIENT_VANISHED, _broken(exc))

    async def _converse(self, stream: trio.abc.Stream) -> Ending:
        framer = LineFramer(MAX_LINE)
        while True:
            try:
                line = await self._read_line(stream, framer)
            except ControlError as error:
                await _send(stream, error.reply())
                return Ending(Outcome(error.code), error.message)
            if line is None:
                return Ending(Outcome.CLOSED)
            try:
                command = parse_request(line)
            except ControlError as error:
                await _send(stream, error.reply())
                continue
            if isinstance(command, WatchCommand):
                return await self._watch(stream)
            if isinstance(command, StopCommand):
                # Reply first: the stop cancels this connection once open
                # agent connections have drained, and the client reads that
                # end as a sign the daemon is on its way out.
                await _send(stream, self.stop_reply())
                log.info("switcher.control.stop_requested")
                self.request_stop()
                continue
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

    async def _watch(self, stream: trio.abc.Stream) -> Ending:
        """Stream events until the client leaves; each task handles its own broken stream."""
        snapshot = self.registry.snapshot()
        await _send(stream, {"ok": True, "watching": True, "choice": choice_id(snapshot)})
        endings: list[Ending] = []

        async with trio.open_nursery() as nursery:

            def end(ending: Ending) -> None:
                endings.append(ending)
                nursery.cancel_scope.cancel()

            async def until_client_leaves() -> None:
                # Anything a watcher sends is ignored; its EOF ends the watch.
                try:
                    while await stream.receive_some(MAX_LINE):
                        pass
                except trio.BrokenResourceError as exc:
                    end(Ending(Outcome.CLIENT_VANISHED, _broken(exc)))
                else:
                    end(Ending(Outcome.WATCH_ENDED))

            async def send_events() -> None:
                try:
                    await self._send_events(stream, snapshot)
                except trio.BrokenResourceError as exc:
                    end(Ending(Outcome.CLIENT_VANISHED, _broken(exc)))

            nursery.start_soon(until_client_leaves)
            nursery.start_soon(send_events)
        return endings[0]  # the first way it ended; the other task was cancelled

    async def _send_events(self, stream: trio.abc.Stream, snapshot: Snapshot) -> None:
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
    async with listener, trio.open_nursery() as nursery:
        task_status.started(service)
        await accept_loop(listener, nursery, service.serve_client, area="control")


def _broken(exc: trio.BrokenResourceError) -> str:
    """Why a stream broke, in a few words: the OS's reason when there is one."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc) or "the connection broke"
