"""The proxy service on real Unix sockets: who the client is, and clients that misbehave."""

from __future__ import annotations

import functools
import os
import socket
import struct
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import trio

from fakes import AgentClient, FakeAgent
from switcher.core import (
    Candidate,
    Health,
    Layout,
    MessageType,
    ProbeResult,
    ProxyServer,
    Registry,
    encode,
    serve_agent_proxy,
    unix_connector,
)

# A reply larger than a Unix socket's buffer: the relay is still sending it
# when the client goes.
_MANY_KEYS = [f"key-{i:04d}-".encode() + b"k" * 330 for i in range(700)]


@attrs.define(eq=False)
class Proxy:
    path: str
    server: ProxyServer
    agent: FakeAgent

    async def client(self) -> AgentClient:
        return AgentClient(await trio.open_unix_socket(self.path))


@pytest.fixture
async def proxy(short_tmp: Path) -> AsyncIterator[Proxy]:
    agent = FakeAgent("agent", keys=_MANY_KEYS)
    registry = Registry()
    agent_path = str(short_tmp / "agent.1")

    async def rescan() -> None:
        pass

    listening = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listening.bind(str(short_tmp / "proxy.sock"))
    listening.listen(16)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve_unix, agent_path)
        registry.reconcile([Candidate(agent_path, Layout.TMP, 1, 1, 100.0)])
        backend = registry.snapshot().backends[0]
        registry.record_probe(backend.id, ProbeResult(Health.HEALTHY))
        server = await nursery.start(
            functools.partial(
                serve_agent_proxy,
                trio.SocketListener(listening),
                registry=registry,
                rescan=rescan,
                grace=0.1,
                connect=unix_connector(refuse_pid=None),
            )
        )
        try:
            yield Proxy(str(short_tmp / "proxy.sock"), server, agent)
        finally:
            server.stop_accepting()
            await server.wait_stopped()
            nursery.cancel_scope.cancel()


def closed_events(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "switcher.proxy.connection_closed"]


class TestClientsThatMisbehave:
    async def test_a_client_resetting_mid_reply_ends_only_its_connection(
        self, proxy: Proxy
    ) -> None:
        """A client that reads part of a large reply and closes (with unread data, so
        the relay sees a reset) ends as client_vanished, crashes nothing, and the next
        client is served."""
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            client = await proxy.client()
            await client.stream.send_all(encode(MessageType.REQUEST_IDENTITIES))
            assert len(await client.stream.receive_some(100)) > 0
            await client.stream.aclose()
            while not closed_events(logs):
                await trio.sleep(0.01)
            served = await proxy.client()
            reply = await served.request(MessageType.REQUEST_IDENTITIES)
            await served.stream.aclose()
            while len(closed_events(logs)) < 2:
                await trio.sleep(0.01)
        assert [(e["outcome"], e["reason"]) for e in closed_events(logs)] == [
            ("client_vanished", None),
            ("ok", None),
        ]
        assert reply == proxy.agent.answer(MessageType.REQUEST_IDENTITIES)
        assert [e["event"] for e in logs if "crashed" in str(e["event"])] == []
        assert proxy.server.statistics().active == 0

    async def test_a_bad_request_is_an_outcome_with_its_reason(self, proxy: Proxy) -> None:
        """A zero-length frame ends the connection as bad_request; the reason says why."""
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            client = await proxy.client()
            await client.stream.send_all(struct.pack(">I", 0))
            assert await client.at_eof()
            await client.stream.aclose()
            while not closed_events(logs):
                await trio.sleep(0.01)
        (closed,) = closed_events(logs)
        assert (closed["outcome"], isinstance(closed["reason"], str)) == ("bad_request", True)


class TestContext:
    async def test_every_connection_event_names_its_client(self, proxy: Proxy) -> None:
        """The connection task binds the client's pid and uid once, and its events carry them."""
        merge = structlog.contextvars.merge_contextvars
        with structlog.testing.capture_logs(processors=[merge]) as logs, trio.fail_after(10):
            client = await proxy.client()
            await client.request(MessageType.REQUEST_IDENTITIES)
            await client.stream.aclose()
            while not closed_events(logs):
                await trio.sleep(0.01)
        (closed,) = closed_events(logs)
        assert (closed["client_pid"], closed["client_uid"]) == (os.getpid(), os.getuid())
        assert structlog.contextvars.get_contextvars() == {}
