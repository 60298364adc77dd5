"""The daemon: one tree of nurseries around one registry.

The root nursery starts each service with ``await nursery.start(...)``, so
"ready" means every service really is: the prober has scanned once, the
proxy accepts. Shutdown runs the other way: stop accepting, let open
connections finish for a short grace, cancel the rest, remove the socket.

Beside the services, two small upkeep tasks: one turns signals into a
shutdown, or (SIGHUP) into a log reopen and a refresh; the other
(``switcher.socketkeeper``) puts our own sockets back when someone deletes
them. When systemd runs us, it hears READY=1 and STOPPING=1.

Errors: each task handles the failures it expects where they arise (a log
file that cannot be reopened, a socket that cannot be put back yet, a
systemd that does not listen) and goes on. Nothing here catches everything:
anything unexpected leaves the root nursery as an exception group and ends
the daemon loudly (the command line logs ``switcher.daemon.crashed``).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import structlog
import trio

from switcher import _systemd
from switcher._signals import HANDLED, RELOAD_SIGNAL, HeldSignals
from switcher.config import Config
from switcher.control import ControlService, DaemonInfo, serve_control
from switcher.core import (
    Affinity,
    LoopGuard,
    Prober,
    ProxyServer,
    Registry,
    Watcher,
    probe,
    scan_settings,
    serve_agent_proxy,
    unix_connector,
)
from switcher.served import Sockets, claim_sockets
from switcher.socketkeeper import SwappableListener, describe, keep_sockets

log = structlog.get_logger()


@attrs.frozen
class DaemonHandle:
    """What a running daemon shares with whoever started it (tests, the control server)."""

    registry: Registry
    prober: Prober
    proxy: ProxyServer
    control: ControlService
    socket_path: Path
    control_path: Path


def _nothing_to_reopen() -> None:
    pass


async def run_daemon(
    config: Config,
    *,
    sockets: Sockets | None = None,
    reopen_logs: Callable[[], None] = _nothing_to_reopen,
    held_signals: HeldSignals | None = None,
    refuse_own_pid: bool = True,
    task_status: trio.TaskStatus[DaemonHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT, SIGTERM or SIGQUIT; SIGHUP reopens the logs and refreshes.

    ``sockets`` are the agent and control sockets when the caller has claimed
    them already (the command line does, to answer "already running" before
    it loads trio; systemd may have passed them); they become ours to
    release. Without them we claim the configured paths. ``reopen_logs`` is
    what SIGHUP calls, for logrotate. ``held_signals`` holds what arrived
    before trio ran (the command line catches signals from before it
    binds): handled as if it came now, so a stop request stops the daemon
    once it has started. ``refuse_own_pid`` guards against relaying to
    ourselves; only tests that serve fake agents inside this very process
    turn it off.
    """
    claimed = sockets
    try:
        # Signals are caught before anyone can connect: whoever can reach the
        # socket may signal us at once, and must not hit the default action.
        # Trio's handlers replace the command line's; what those held is
        # raised again, for trio's.
        with trio.open_signal_receiver(*HANDLED) as signals:
            if held_signals is not None:
                held_signals.hand_over()
            if claimed is None:
                claimed = claim_sockets(config.socket_path, config.control_path)
            refuse_pid = os.getpid() if refuse_own_pid else None
            await _serve(config, claimed, signals, refuse_pid, reopen_logs, task_status)
    finally:
        if claimed is not None:
            for served in reversed(claimed):
                served.release()
            log.info("switcher.daemon.stopped", socket=str(config.socket_path))


async def _serve(
    config: Config,
    sockets: Sockets,
    signals: AsyncIterator[int],
    refuse_pid: int | None,
    reopen_logs: Callable[[], None],
    task_status: trio.TaskStatus[DaemonHandle],
) -> None:
    registry = Registry()
    # One inotify descriptor for the agents dirs and our own sockets; without
    # it (or with watching turned off) both are looked at every probe cycle.
    watcher = Watcher.open() if config.watch else Watcher(None)
    # The prober sends loop checks; the proxy recognises them coming back.
    loops = LoopGuard()
    prober = Prober(
        registry,
        # Our own sockets are never backends, whatever they are named.
        scan_settings(
            config.agents_dirs, exclude=_identities(sockets), local_agents=config.local_agents
        ),
        interval=config.probe_interval,
        probe_timeout=config.probe_timeout,
        refuse_pid=refuse_pid,
        watcher=watcher,
        probe_path=functools.partial(probe, loops=loops),
    )
    listeners = [SwappableListener(served.sock) for served in sockets]
    # One view of processes and tmux, for the relay (when --affinity is on)
    # and for `ctl why` and `ctl list` (always).
    affinity = Affinity.for_own_processes()
    async with trio.open_nursery() as root:
        await root.start(watcher.run)
        await root.start(prober.serve)
        proxy = await root.start(
            functools.partial(
                serve_agent_proxy,
                listeners[0],
                registry=registry,
                rescan=prober.rescan_for_miss,
                grace=config.grace,
                connect=unix_connector(refuse_pid=refuse_pid),
                loops=loops,
                affinity=affinity if config.affinity else None,
            )
        )
        stopping = trio.Event()

        def stop(**why: object) -> None:
            if stopping.is_set():
                return  # a SIGTERM and a `switcher stop` together stop it once
            log.info("switcher.daemon.stopping", **why, open_connections=proxy.active_connections)
            stopping.set()

        control_service = ControlService(
            registry,
            prober,
            DaemonInfo(
                pid=os.getpid(),
                socket_path=config.socket_path,
                control_path=config.control_path,
                agents_dirs=config.agents_dirs,
                started=time.monotonic(),
            ),
            proxy_statistics=proxy.statistics,
            request_stop=functools.partial(stop, reason="stop_requested"),
            affinity=affinity,
            affinity_on=config.affinity,
        )
        await root.start(serve_control, listeners[1], control_service)
        log.info(
            "switcher.daemon.started",
            pid=os.getpid(),
            socket=str(config.socket_path),
            control=str(config.control_path),
            agents_dirs=list(config.agents_dirs),
            backends=len(registry.snapshot().backends),
            activated=[str(s.path) for s in sockets if s.is_activated],
        )
        _notify(config, "READY=1", f"STATUS=serving {config.socket_path}")
        task_status.started(
            DaemonHandle(
                registry, prober, proxy, control_service, config.socket_path, config.control_path
            )
        )

        def exclude_own_sockets() -> None:
            prober.scanner.settings = attrs.evolve(
                prober.scanner.settings, exclude=_identities(sockets)
            )

        async with trio.open_nursery() as upkeep:
            upkeep.start_soon(
                functools.partial(
                    _handle_signals, signals, reopen_logs=reopen_logs, prober=prober, stop=stop
                )
            )
            upkeep.start_soon(
                functools.partial(
                    keep_sockets,
                    list(zip(sockets, listeners, strict=True)),
                    watcher=watcher,
                    rebound=exclude_own_sockets,
                    stop=stop,
                )
            )
            await stopping.wait()
            upkeep.cancel_scope.cancel()
        _notify(config, "STOPPING=1", "STATUS=stopping")
        proxy.stop_accepting()
        await proxy.wait_stopped()
        root.cancel_scope.cancel()


def _identities(sockets: Sockets) -> frozenset[tuple[int, int]]:
    return frozenset(s.identity for s in sockets if s.identity is not None)


async def _handle_signals(
    signals: AsyncIterator[int],
    *,
    reopen_logs: Callable[[], None],
    prober: Prober,
    stop: Callable[..., None],
) -> None:
    """Stop on SIGINT, SIGTERM or SIGQUIT; on SIGHUP reopen the logs and refresh."""
    async with trio.open_nursery() as refreshes:
        async for signum in signals:
            if signum != RELOAD_SIGNAL:
                stop(signal=signal.Signals(signum).name)
                return
            try:
                reopen_logs()  # first, so the lines about this SIGHUP go to the new file
            except OSError as exc:
                log.error("switcher.daemon.log_reopen_failed", reason=describe(exc))
            log.info("switcher.daemon.sighup")
            refreshes.start_soon(_refresh, prober)


async def _refresh(prober: Prober) -> None:
    report = await prober.refresh()
    log.info(
        "switcher.daemon.refreshed",
        added=len(report.added),
        removed=len(report.removed),
        backends=len(prober.registry.snapshot().backends),
    )


def _notify(config: Config, *fields: str) -> None:
    """Tell systemd (when it runs us as a Type=notify service); never fatal."""
    if config.notify_socket is None:
        return
    try:
        _systemd.notify(config.notify_socket, "\n".join(fields))
    except OSError as exc:
        log.warning("switcher.daemon.notify_failed", reason=describe(exc))
