"""A daemon running in this process on real Unix sockets, with fake agents as its sessions."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from fakes import AgentClient, FakeAgent, LoopAgent
from switcher.config import Config
from switcher.core import Health, MessageType, Snapshot
from switcher.daemon import DaemonHandle, run_daemon


@attrs.define(eq=False)
class World:
    """A daemon under test, its agents dir, and helpers to add sessions."""

    root: Path
    agents_dir: Path
    nursery: trio.Nursery
    daemon: DaemonHandle | None = None
    # Streams the test opened that the world closes at the end.
    on_close: list[trio.abc.AsyncResource] = attrs.Factory(list)
    _sessions: int = 0
    _newest_ctime: float = 0.0

    def session_dir(self) -> Path:
        """A fresh sshd-style ``ssh-XXXX`` directory, mode 0700."""
        self._sessions += 1
        path = self.agents_dir / f"ssh-{self._sessions:010d}"
        path.mkdir(mode=0o700)
        return path

    async def start_agent(
        self, agent: FakeAgent | LoopAgent, path: Path | None = None
    ) -> tuple[Path, trio.CancelScope]:
        """Serve ``agent`` on a new forwarded-agent socket; cancel the scope to end the session."""
        path = path or self.session_dir() / "agent.1"
        scope = trio.CancelScope()

        async def session(*, task_status: trio.TaskStatus[trio.SocketListener]) -> None:
            with scope:
                await agent.serve_unix(str(path), task_status=task_status)
            path.unlink(missing_ok=True)  # sshd removes the socket when the session ends

        await self.nursery.start(session)
        await self._make_newest(path)
        return path, scope

    async def _make_newest(self, path: Path) -> None:
        """Make ``path``'s ctime later than every earlier session's.

        File timestamps tick at kernel-jiffy granularity, so two sockets made
        within a few milliseconds can tie; chmod (a no-op here) restamps it.
        """
        newest = self._newest_ctime
        while path.stat().st_ctime <= newest:
            await trio.sleep(0.001)
            path.chmod(0o755)
        self._newest_ctime = path.stat().st_ctime

    async def start_daemon(self, **overrides: object) -> DaemonHandle:
        config = Config(
            socket_path=self.root / "s.sock",
            control_path=self.root / "c.sock",
            agents_dirs=(str(self.agents_dir),),
            probe_interval=3600.0,  # only the watcher and misses may find changes
            probe_timeout=0.2,
            grace=0.5,
        )
        config = attrs.evolve(config, **overrides)  # type: ignore[arg-type]
        self.daemon = await self.nursery.start(
            functools.partial(run_daemon, config, refuse_own_pid=False)
        )
        return self.daemon

    async def aclose(self) -> None:
        for resource in self.on_close:
            await resource.aclose()

    async def client(self) -> AgentClient:
        assert self.daemon is not None
        return AgentClient(await trio.open_unix_socket(str(self.daemon.socket_path)))

    async def wait_until(self, condition: Callable[[Snapshot], bool]) -> Snapshot:
        """Wait, without polling sleeps, until the registry satisfies ``condition``."""
        assert self.daemon is not None
        registry = self.daemon.registry
        while not condition(snapshot := registry.snapshot()):
            await registry.wait_changed(snapshot.version)
        return snapshot


def chosen(path: Path) -> Callable[[Snapshot], bool]:
    def check(snapshot: Snapshot) -> bool:
        choice = snapshot.choice
        return choice is not None and choice.path == str(path) and choice.health is Health.HEALTHY

    return check


async def identities(world: World) -> bytes:
    client = await world.client()
    async with client.stream:
        return await client.request(MessageType.REQUEST_IDENTITIES)


def answer(agent: FakeAgent) -> bytes:
    return agent.answer(MessageType.REQUEST_IDENTITIES)


@attrs.define(eq=False)
class WakeUps(trio.abc.Instrument):
    """The virtual times at which the run loop woke after time had moved: timer wake-ups."""

    times: list[float] = attrs.Factory(list)
    _last: float = 0.0

    def after_io_wait(self, timeout: float) -> None:  # noqa: ARG002 (the instrument's signature)
        now = trio.current_time()
        if now != self._last:
            self._last = now
            self.times.append(now)
