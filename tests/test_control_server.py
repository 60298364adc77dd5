"""The control server: commands over memory streams, then through a real daemon."""

from __future__ import annotations

import array
import fcntl
import json
import termios
import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import trio
import trio.testing

from fakes import FakeAgent
from switcher.control import ControlService, DaemonInfo, serve_control
from switcher.core import (
    Candidate,
    Health,
    Layout,
    Prober,
    ProbeResult,
    ProxyStatistics,
    Registry,
    ScanSettings,
)
from switcher.core._discovery import host_hash
from world import World, answer, identities


def no_traffic() -> ProxyStatistics:
    return ProxyStatistics(total=0, active=0, failovers=0, answered_locally=0)


@attrs.define(eq=False)
class LineClient:
    """A control client on any stream: JSON lines out, JSON lines in."""

    stream: trio.abc.Stream
    buffer: bytes = b""

    async def send(self, value: object) -> None:
        await self.stream.send_all(json.dumps(value).encode() + b"\n")

    async def read(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("control connection closed")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        value = json.loads(line)
        assert isinstance(value, dict)
        return value

    async def call(self, value: object) -> dict[str, Any]:
        await self.send(value)
        return await self.read()

    async def at_eof(self) -> bool:
        return not self.buffer and await self.stream.receive_some(1) == b""


@attrs.define(eq=False)
class Service:
    registry: Registry
    control: ControlService
    nursery: trio.Nursery
    stop_requested: trio.Event

    def connect(self) -> LineClient:
        ours, theirs = trio.testing.memory_stream_pair()

        async def serve() -> None:
            async with theirs:  # as serve_control does: the handler's end closes it
                await self.control.handle(theirs)

        self.nursery.start_soon(serve)
        return LineClient(ours)

    def add(self, path: str, ctime: float, health: Health) -> str:
        known = [
            Candidate(b.path, b.layout, b.dev, b.ino, b.appeared)
            for b in self.registry.snapshot().backends
        ]
        self.registry.reconcile([*known, Candidate(path, Layout.TMP, 1, int(ctime), ctime)])
        backend = next(b for b in self.registry.snapshot().backends if b.path == path)
        self.registry.record_probe(backend.id, ProbeResult(health, latency=0.001, key_count=1))
        return backend.id


@pytest.fixture
async def service(short_tmp: Path) -> AsyncIterator[Service]:
    registry = Registry()
    settings = ScanSettings((str(short_tmp / "none"),), uid=0, host_hash=host_hash())
    stop_requested = trio.Event()
    control = ControlService(
        registry,
        Prober(registry, settings, interval=5.0, probe_timeout=2.0),
        DaemonInfo(1, short_tmp / "s.sock", short_tmp / "c.sock", ("/x",), time.monotonic()),
        proxy_statistics=no_traffic,
        request_stop=stop_requested.set,
    )
    async with trio.open_nursery() as nursery:
        yield Service(registry, control, nursery, stop_requested)
        nursery.cancel_scope.cancel()


V1 = {"v": 1}


class TestCommands:
    async def test_list_in_rank_order_with_the_choice(self, service: Service) -> None:
        """list returns every backend in rank order and names the one a client would get."""
        old = service.add("/a/old", 100, Health.HEALTHY)
        new = service.add("/a/new", 200, Health.HEALTHY)
        dead = service.add("/a/dead", 300, Health.DEAD)
        with trio.fail_after(5):
            reply = await service.connect().call({**V1, "cmd": "list"})
        assert (reply["ok"], reply["choice"], [b["id"] for b in reply["backends"]]) == (
            True,
            new,
            [new, old, dead],
        )

    async def test_prefer_then_clear(self, service: Service) -> None:
        """prefer pins a backend by id prefix, making it the choice; clear undoes it."""
        old = service.add("/a/old", 100, Health.HEALTHY)
        new = service.add("/a/new", 200, Health.HEALTHY)
        with trio.fail_after(5):
            client = service.connect()
            pinned = await client.call({**V1, "cmd": "prefer", "id": old[:5]})
            listed = await client.call({**V1, "cmd": "list"})
            cleared = await client.call({**V1, "cmd": "prefer", "clear": True})
        assert pinned == {"ok": True, "pinned": old, "path": "/a/old", "choice": old}
        assert next((b["id"], b["reason"]) for b in listed["backends"]) == (old, "pinned")
        assert cleared == {"ok": True, "pinned": None, "path": None, "choice": new}

    async def test_prefer_only_accepts_known_backends(self, service: Service) -> None:
        """A path that is not in the registry cannot be pinned."""
        service.add("/a/known", 100, Health.HEALTHY)
        with trio.fail_after(5):
            reply = await service.connect().call({**V1, "cmd": "prefer", "id": "/tmp/evil"})
        assert reply["error"]["code"] == "not_found"
        assert service.registry.snapshot().pinned is None

    async def test_status(self, service: Service) -> None:
        """status reports pid, paths, counts and the current choice."""
        backend = service.add("/a/one", 100, Health.HEALTHY)
        with trio.fail_after(5):
            reply = await service.connect().call({**V1, "cmd": "status"})
        assert {k: reply[k] for k in ("ok", "pid", "backends", "healthy", "choice", "pinned")} == {
            "ok": True,
            "pid": 1,
            "backends": 1,
            "healthy": 1,
            "choice": backend,
            "pinned": None,
        }
        assert reply["connections"] == {
            "total": 0,
            "active": 0,
            "failovers": 0,
            "answered_locally": 0,
        }

    async def test_stop_replies_then_asks_the_daemon_to_stop(self, service: Service) -> None:
        """stop answers with the daemon's pid and paths, then starts the daemon's stop."""
        with trio.fail_after(5):
            client = service.connect()
            reply = await client.call({**V1, "cmd": "stop"})
            await service.stop_requested.wait()
        assert reply == {
            "ok": True,
            "stopping": True,
            "pid": 1,
            "socket_path": str(service.control.info.socket_path),
            "control_path": str(service.control.info.control_path),
        }

    async def test_watch_streams_choice_changes(self, service: Service) -> None:
        """watch acknowledges, then reports a health change and the choice moving."""
        old = service.add("/a/old", 100, Health.HEALTHY)
        new = service.add("/a/new", 200, Health.HEALTHY)
        with trio.fail_after(5):
            client = service.connect()
            assert await client.call({**V1, "cmd": "watch"}) == {
                "ok": True,
                "watching": True,
                "choice": new,
            }
            service.registry.record_probe(new, ProbeResult(Health.DEAD, error="gone"))
            events = [await client.read(), await client.read()]
        assert events == [
            {"event": "health_changed", "id": new, "from": "healthy", "to": "dead"},
            {"event": "choice_changed", "choice": old, "previous": new},
        ]

    async def test_watch_ends_when_the_client_leaves(self, service: Service) -> None:
        """A watcher that closes its side is let go (its task ends)."""
        with trio.fail_after(5):
            client = service.connect()
            await client.call({**V1, "cmd": "watch"})
            await client.stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
        # Only the fixture's own nursery remains: no watch task is left behind.
        assert service.nursery.child_tasks == set()


class TestBadInput:
    @pytest.mark.parametrize(
        ("line", "code"),
        [
            (b"nonsense\n", "bad_json"),
            (b"[]\n", "not_an_object"),
            (b'{"v":9,"cmd":"list"}\n', "unsupported_version"),
            (b'{"v":1,"cmd":"reboot"}\n', "unknown_command"),
            (b'{"v":1,"cmd":"prefer"}\n', "bad_argument"),
        ],
    )
    async def test_error_reply_then_the_connection_still_works(
        self, service: Service, line: bytes, code: str
    ) -> None:
        """A bad request gets an error reply, and the next request on the same connection works."""
        with trio.fail_after(5):
            client = service.connect()
            await client.stream.send_all(line)
            error = await client.read()
            ok = await client.call({**V1, "cmd": "list"})
        assert (error["ok"], error["error"]["code"], ok["ok"]) == (False, code, True)

    async def test_oversized_line_is_refused_and_closed(self, service: Service) -> None:
        """A line over 64 KiB gets line_too_long and the connection is closed."""
        with trio.fail_after(5):
            client = service.connect()
            await client.stream.send_all(b"x" * (64 * 1024 + 10))
            reply = await client.read()
            assert await client.at_eof()
        assert reply["error"]["code"] == "line_too_long"

    async def test_silent_client_is_dropped_after_the_idle_timeout(
        self,
        service: Service,
        autojump_clock: trio.testing.MockClock,  # noqa: ARG002 (pytest-trio runs the test on it)
    ) -> None:
        """A client that sends nothing gets idle_timeout after 30 s and is closed."""
        with trio.fail_after(60):  # virtual seconds: the autojump clock skips the wait
            client = service.connect()
            reply = await client.read()
            assert await client.at_eof()
        assert reply["error"]["code"] == "idle_timeout"

    async def test_half_a_line_then_gone(self, service: Service) -> None:
        """A client that sends half a request and vanishes leaves nothing behind."""
        with trio.fail_after(5):
            client = service.connect()
            await client.stream.send_all(b'{"v":1,"cm')
            await client.stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            ok = await service.connect().call({**V1, "cmd": "list"})
        assert ok["ok"] is True


Logs = list[MutableMapping[str, Any]]


def unread_bytes(client: LineClient) -> int:
    """How many bytes wait, unread, in the client socket's receive queue (FIONREAD)."""
    assert isinstance(client.stream, trio.SocketStream)
    count = array.array("i", [0])
    fcntl.ioctl(client.stream.socket.fileno(), termios.FIONREAD, count)
    return count[0]


def leave(client: LineClient) -> None:
    """Close the client's socket at once, whatever it has not read."""
    assert isinstance(client.stream, trio.SocketStream)
    client.stream.socket.close()


@attrs.define(eq=False)
class Served:
    """The control server on a real Unix socket, with its log captured."""

    service: Service
    path: Path
    logs: Logs
    scope: trio.CancelScope

    async def connect(self) -> LineClient:
        return LineClient(await trio.open_unix_socket(str(self.path)))

    async def wait_closed(self, count: int = 1) -> list[str]:
        """Wait until ``count`` control connections have ended; return their outcomes."""
        while len(closed := self.events("switcher.control.connection_closed")) < count:
            await trio.testing.wait_all_tasks_blocked()
        return [str(event["outcome"]) for event in closed]

    def events(self, name: str) -> Logs:
        return [event for event in self.logs if event["event"] == name]


@pytest.fixture
async def served(service: Service, short_tmp: Path) -> AsyncIterator[Served]:
    path = short_tmp / "c.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    scope = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[ControlService]) -> None:
        with scope:
            await serve_control(trio.SocketListener(sock), service.control, task_status=task_status)

    with structlog.testing.capture_logs() as logs:
        await service.nursery.start(serve)
        yield Served(service, path, logs, scope)


class TestHowConnectionsEnd:
    """Each way a control connection ends is logged with its outcome. A client that goes away,
    however rudely, is never a crash: only a bug is."""

    async def test_a_watcher_that_closes_without_reading(self, served: Served) -> None:
        """A watcher that leaves with the first reply unread (a reset) ends as client_vanished."""
        with trio.fail_after(5):
            client = await served.connect()
            await client.send({**V1, "cmd": "watch"})
            await trio.testing.wait_all_tasks_blocked()
            assert unread_bytes(client) > 0  # the first reply is there, unread
            leave(client)
            outcomes = await served.wait_closed()
        assert (outcomes, served.events("switcher.control.connection_crashed")) == (
            ["client_vanished"],
            [],
        )

    async def test_a_watcher_that_leaves_with_an_event_unread(self, served: Served) -> None:
        """A watcher that read the first reply but leaves with an event unread ends the same."""
        served.service.add("/a/one", 100, Health.HEALTHY)
        with trio.fail_after(5):
            client = await served.connect()
            assert (await client.call({**V1, "cmd": "watch"}))["watching"] is True
            served.service.add("/a/two", 200, Health.HEALTHY)
            await trio.testing.wait_all_tasks_blocked()
            assert unread_bytes(client) > 0  # the events are there, unread
            leave(client)
            outcomes = await served.wait_closed()
        assert (outcomes, served.events("switcher.control.connection_crashed")) == (
            ["client_vanished"],
            [],
        )

    async def test_a_watcher_that_stops_reading(self, served: Served) -> None:
        """A watcher that reads nothing stalls only itself: others are served; it ends quietly."""
        a = served.service.add("/a/one", 100, Health.HEALTHY)
        b = served.service.add("/a/two", 200, Health.HEALTHY)
        with trio.fail_after(10):
            stuck = await served.connect()
            await stuck.send({**V1, "cmd": "watch"})
            # Move the pin until the daemon's writes stop arriving: the
            # socket's buffer is full and the watch waits in send_all.
            arrived = -1
            while arrived != (arrived := unread_bytes(stuck)):
                for target in (a, b):
                    served.service.registry.pin(target)
                    await trio.testing.wait_all_tasks_blocked()
            other = await served.connect()
            reply = await other.call({**V1, "cmd": "status"})
            await other.stream.aclose()
            leave(stuck)
            outcomes = await served.wait_closed(2)
        assert (reply["ok"], sorted(outcomes)) == (True, ["client_vanished", "closed"])
        assert served.events("switcher.control.connection_crashed") == []

    async def test_a_watcher_open_when_the_daemon_stops(self, served: Served) -> None:
        """Watchers still open when the server is cancelled end as stopped, not as errors."""
        with trio.fail_after(5):
            client = await served.connect()
            await client.call({**V1, "cmd": "watch"})
            served.scope.cancel()
            outcomes = await served.wait_closed()
            assert await client.at_eof()
            await client.stream.aclose()
        assert (outcomes, served.events("switcher.control.connection_crashed")) == (
            ["stopped"],
            [],
        )

    async def test_ordinary_ends_have_their_own_outcomes(self, served: Served) -> None:
        """A client that closes between requests, a watcher that closes, and one refused for a
        line over the limit each end with the outcome that says so, and no crash."""
        with trio.fail_after(5):
            plain = await served.connect()
            await plain.call({**V1, "cmd": "list"})
            await plain.stream.aclose()
            await served.wait_closed(1)
            watcher = await served.connect()
            await watcher.call({**V1, "cmd": "watch"})
            await watcher.stream.aclose()
            await served.wait_closed(2)
            oversized = await served.connect()
            await oversized.stream.send_all(b"x" * (64 * 1024 + 10))
            assert (await oversized.read())["error"]["code"] == "line_too_long"
            await oversized.stream.aclose()
            await served.wait_closed(3)
        closed = served.events("switcher.control.connection_closed")
        assert [(e["outcome"], e["reason"]) for e in closed] == [
            ("closed", None),
            ("watch_ended", None),
            ("line_too_long", "request line exceeds 65536 bytes"),
        ]
        assert served.events("switcher.control.connection_crashed") == []

    async def test_a_bug_is_logged_as_a_crash_and_the_server_goes_on(
        self, served: Served, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bug met while serving one client is logged with its traceback as a crash, and
        the next client is served."""

        def broken() -> ProxyStatistics:
            raise RuntimeError("a bug behind status")

        monkeypatch.setattr(served.service.control, "proxy_statistics", broken)
        with trio.fail_after(5):
            victim = await served.connect()
            await victim.send({**V1, "cmd": "status"})
            assert await victim.at_eof()
            await victim.stream.aclose()
            outcomes = await served.wait_closed()
            next_client = await served.connect()
            after = await next_client.call({**V1, "cmd": "list"})
            await next_client.stream.aclose()
        crashes = served.events("switcher.control.connection_crashed")
        assert (outcomes, len(crashes), after["ok"]) == (["crashed"], 1, True)
        assert crashes[0]["exc_info"] is True

    async def test_a_client_that_leaves_mid_reply(self, served: Served) -> None:
        """A client that leaves while a long reply is being written ends as client_vanished."""
        registry = served.service.registry
        registry.reconcile(  # a list reply far larger than the socket's buffer
            [Candidate(f"/a/{'x' * 200}/{n}", Layout.TMP, 1, n, 100.0 + n) for n in range(1000)]
        )
        with trio.fail_after(10):
            client = await served.connect()
            await client.send({**V1, "cmd": "list"})
            assert (await client.stream.receive_some(100)).startswith(b'{"ok":true')
            leave(client)
            outcomes = await served.wait_closed()
        assert (outcomes, served.events("switcher.control.connection_crashed")) == (
            ["client_vanished"],
            [],
        )


async def control(world: World) -> LineClient:
    """A control connection to the world's daemon, closed when the world ends."""
    assert world.daemon is not None
    stream = await trio.open_unix_socket(str(world.daemon.control_path))
    world.on_close.append(stream)
    return LineClient(stream)


class TestThroughTheDaemon:
    async def test_prefer_changes_which_agent_serves_and_ends_with_its_session(
        self, world: World
    ) -> None:
        """A pinned older session serves the next request; when it ends, the newer serves again."""
        old, new = FakeAgent("old", keys=[b"old"]), FakeAgent("new", keys=[b"new"])
        with trio.fail_after(10):
            old_path, old_session = await world.start_agent(old)
            _new_path, _ = await world.start_agent(new)
            await world.start_daemon()
            await world.wait_until(
                lambda s: (
                    all(b.health is Health.HEALTHY for b in s.backends) and len(s.backends) == 2
                )
            )
            assert await identities(world) == answer(new)
            ctl = await control(world)
            listed = await ctl.call({**V1, "cmd": "list"})
            old_id = next(b["id"] for b in listed["backends"] if b["path"] == str(old_path))
            assert (await ctl.call({**V1, "cmd": "prefer", "id": old_id}))["choice"] == old_id
            assert await identities(world) == answer(old)
            old_session.cancel()
            await world.wait_until(lambda s: s.pinned is None)
            assert await identities(world) == answer(new)

    async def test_refresh_reports_sessions_that_came_and_went(self, world: World) -> None:
        """refresh rescans now and names the session that appeared and the one that vanished."""
        gone, stays = FakeAgent("gone"), FakeAgent("stays")
        with trio.fail_after(10):
            gone_path, gone_session = await world.start_agent(gone)
            await world.start_agent(stays)
            # No watcher and no periodic probe: only refresh can notice.
            await world.start_daemon(watch=False)
            await world.wait_until(lambda s: len(s.backends) == 2)
            ctl = await control(world)
            gone_session.cancel()
            fresh_path, _ = await world.start_agent(FakeAgent("fresh"))
            reply = await ctl.call({**V1, "cmd": "refresh"})
        assert (
            [b["path"] for b in reply["added"]],
            [b["path"] for b in reply["removed"]],
            [(c["from"], c["to"]) for c in reply["health_changes"]],
        ) == ([str(fresh_path)], [str(gone_path)], [("unknown", "healthy")])
        assert reply["removed"][0]["reason"] == "removed: its socket is gone"
        assert reply["added"][0]["id"] == reply["choice"]

    async def test_watch_delivers_a_choice_change(self, world: World) -> None:
        """A watcher hears about a new session and the choice moving to it."""
        with trio.fail_after(10):
            await world.start_agent(FakeAgent("old"))
            await world.start_daemon()
            old = (
                await world.wait_until(
                    lambda s: s.choice is not None and s.choice.health is Health.HEALTHY
                )
            ).choice
            assert old is not None
            ctl = await control(world)
            assert (await ctl.call({**V1, "cmd": "watch"}))["choice"] == old.id
            new_path, _ = await world.start_agent(FakeAgent("new"))
            events: list[dict[str, Any]] = []
            while not any(e["event"] == "choice_changed" for e in events):
                events.append(await ctl.read())
        added = [e for e in events if e["event"] == "backend_added"]
        assert [e["backend"]["path"] for e in added] == [str(new_path)]
        assert events[-1]["previous"] == old.id

    async def test_bad_control_clients_do_not_disturb_the_proxy(self, world: World) -> None:
        """Garbage, oversized lines and hundreds of idle control clients: agents still served."""
        agent = FakeAgent("one")
        with trio.fail_after(20):
            await world.start_agent(agent)
            await world.start_daemon()
            idle = [await control(world) for _ in range(200)]
            late = await control(world)  # beyond the cap of 64 (the idle ones hold slots)
            busy = await late.read()
            garbage = await control(world)
            await garbage.stream.send_all(b"\x00\xff" * 40000)
            assert await identities(world) == answer(agent)
            for client in idle:
                await client.stream.aclose()
        assert busy["error"]["code"] == "busy"
