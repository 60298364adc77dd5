"""The daemon: one tree of nurseries around one registry.

The root nursery starts each service with ``await nursery.start(...)``, so
"ready" means every service really is: the prober has scanned once, the
proxy accepts. Shutdown runs the other way: stop accepting, let open
connections finish for a short grace, cancel the rest, remove the socket.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import structlog
import trio

from switcher import paths
from switcher.config import Config
from switcher.control import ControlService, DaemonInfo, serve_control
from switcher.core import (
    Prober,
    ProxyServer,
    Registry,
    scan_settings,
    serve_agent_proxy,
    unix_connector,
)

log = structlog.get_logger()

# Connections the kernel queues before we accept them. Logins come in
# bursts (a git operation can open dozens of agent connections), and
# queued clients cost us nothing.
_LISTEN_BACKLOG = 512

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


@attrs.frozen
class DaemonHandle:
    """What a running daemon shares with whoever started it (tests, the control server)."""

    registry: Registry
    prober: Prober
    proxy: ProxyServer
    control: ControlService
    socket_path: Path
    control_path: Path


@attrs.define(eq=False)
class OwnedSocket:
    """A listening socket at a path we claimed, and the lock that guards it."""

    path: Path
    sock: socket.socket
    lock_fd: int
    dev: int
    ino: int

    @classmethod
    def claim(cls, path: Path) -> OwnedSocket:
        """Take the lock, clear a stale socket, bind; or raise with the reason we cannot."""
        paths.prepare_socket_dir(path, default_dir=paths.runtime_dir())
        lock_fd = paths.lock_for(path)
        try:
            paths.claim_socket_path(path)
            sock = paths.bind_private_socket(path, _LISTEN_BACKLOG)
            st = path.lstat()
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, sock, lock_fd, st.st_dev, st.st_ino)

    def release(self) -> None:
        """Close, and unlink the socket only if the path still holds our inode."""
        self.sock.close()
        try:
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == (self.dev, self.ino):
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.lock_fd)


async def run_daemon(
    config: Config,
    *,
    refuse_own_pid: bool = True,
    task_status: trio.TaskStatus[DaemonHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT, SIGTERM or SIGQUIT; SIGHUP never stops us.

    ``refuse_own_pid`` guards against relaying to ourselves; only tests that
    serve fake agents inside this very process turn it off.
    """
    # Signals are caught before the sockets exist: whoever sees the socket
    # accept may signal us at once, and must not hit the default action.
    with trio.open_signal_receiver(*_STOP_SIGNALS, signal.SIGHUP) as signals:
        agent = OwnedSocket.claim(config.socket_path)
        try:
            control = OwnedSocket.claim(config.control_path)
        except BaseException:
            agent.release()
            raise
        refuse_pid = os.getpid() if refuse_own_pid else None
        try:
            await _serve(config, agent, control, signals, refuse_pid, task_status)
        finally:
            control.release()
            agent.release()
            log.info("switcher.daemon.stopped", socket=str(config.socket_path))


async def _serve(
    config: Config,
    agent: OwnedSocket,
    control: OwnedSocket,
    signals: AsyncIterator[int],
    refuse_pid: int | None,
    task_status: trio.TaskStatus[DaemonHandle],
) -> None:
    registry = Registry()
    prober = Prober(
        registry,
        # Our own sockets are never backends, whatever they are named.
        scan_settings(
            config.agents_dirs,
            exclude=frozenset({(agent.dev, agent.ino), (control.dev, control.ino)}),
        ),
        interval=config.probe_interval,
        probe_timeout=config.probe_timeout,
        refuse_pid=refuse_pid,
        watch_interval=config.watch_interval,
    )
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(agent.sock))
    async with trio.open_nursery() as root:
        await root.start(prober.serve)
        proxy = await root.start(
            functools.partial(
                serve_agent_proxy,
                listener,
                registry=registry,
                rescan=prober.rescan_for_miss,
                grace=config.grace,
                connect=unix_connector(refuse_pid=refuse_pid),
            )
        )
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
        )
        await root.start(
            serve_control,
            trio.SocketListener(trio.socket.from_stdlib_socket(control.sock)),
            control_service,
        )
        log.info(
            "switcher.daemon.started",
            pid=os.getpid(),
            socket=str(config.socket_path),
            control=str(config.control_path),
            agents_dirs=list(config.agents_dirs),
            backends=len(registry.snapshot().backends),
        )
        task_status.started(
            DaemonHandle(
                registry, prober, proxy, control_service, config.socket_path, config.control_path
            )
        )
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("switcher.daemon.sighup")
                continue
            log.info(
                "switcher.daemon.stopping", signal=name, open_connections=proxy.active_connections
            )
            break
        proxy.stop_accepting()
        await proxy.wait_stopped()
        root.cancel_scope.cancel()
