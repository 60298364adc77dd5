"""The relay logic, against fake agents over memory streams."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import attrs
import pytest
import structlog
import trio
import trio.testing

from fakes import AgentClient, Behaviour, FakeAgent, MemoryBackends, identities_body
from switcher.core import (
    Candidate,
    Health,
    Layout,
    MessageType,
    ProbeResult,
    Registry,
    encode,
    relay_connection,
)

FAILURE = encode(MessageType.FAILURE)


def candidate(path: str, ctime: float) -> Candidate:
    return Candidate(path=path, layout=Layout.TMP, dev=1, ino=abs(hash(path)), ctime=ctime)


@attrs.define(eq=False)
class Harness:
    """A registry, fake backends, and a way to open client connections through the proxy."""

    nursery: trio.Nursery
    registry: Registry
    backends: MemoryBackends
    rescans: int = 0
    on_rescan: list[Candidate] | None = None
    outcomes: list[str] = attrs.Factory(list)

    def add(self, agent: FakeAgent | None, path: str, ctime: float, *, health: Health) -> str:
        """Register a backend at ``path`` (served by ``agent``, or refusing if None)."""
        existing = [candidate(b.path, b.appeared) for b in self.registry.snapshot().backends]
        self.registry.reconcile([*existing, candidate(path, ctime)])
        if agent is not None:
            self.backends.agents[path] = agent
        backend = next(b for b in self.registry.snapshot().backends if b.path == path)
        self.registry.record_probe(backend.id, ProbeResult(health))
        return backend.id

    async def rescan(self) -> None:
        self.rescans += 1
        if self.on_rescan is not None:
            self.registry.reconcile(self.on_rescan)

    def open_client(self) -> AgentClient:
        ours, theirs = trio.testing.memory_stream_pair()

        async def serve() -> None:
            outcome = await relay_connection(
                theirs, registry=self.registry, connect=self.backends.connect, rescan=self.rescan
            )
            self.outcomes.append(outcome.outcome.value)

        self.nursery.start_soon(serve)
        return AgentClient(ours)

    async def wait_outcomes(self, count: int) -> list[str]:
        """Wait until ``count`` connections have finished; return their outcomes."""
        while len(self.outcomes) < count:
            await trio.testing.wait_all_tasks_blocked()
        return self.outcomes


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        yield Harness(nursery, Registry(), MemoryBackends(nursery))
        nursery.cancel_scope.cancel()


async def identities(client: AgentClient) -> bytes:
    return await client.request(MessageType.REQUEST_IDENTITIES)


def answer_of(agent: FakeAgent) -> bytes:
    return agent.answer(MessageType.REQUEST_IDENTITIES)


class TestRelay:
    async def test_relays_to_the_best_backend(self, harness: Harness) -> None:
        """A request reaches the newest healthy backend and its reply comes back whole."""
        old, new = FakeAgent("old", keys=[b"old-key"]), FakeAgent("new", keys=[b"new-key"])
        harness.add(old, "/a/old", 100, health=Health.HEALTHY)
        harness.add(new, "/a/new", 200, health=Health.HEALTHY)
        with trio.fail_after(5):
            client = harness.open_client()
            assert await identities(client) == answer_of(new)
        assert old.connections == 0

    async def test_pipelined_requests_are_answered_in_order(self, harness: Harness) -> None:
        """Several requests sent at once get their replies in order."""
        agent = FakeAgent("a")
        harness.add(agent, "/a/1", 100, health=Health.HEALTHY)
        with trio.fail_after(5):
            client = harness.open_client()
            await client.stream.send_all(
                encode(MessageType.REQUEST_IDENTITIES)
                + encode(MessageType.SIGN_REQUEST, b"x")
                + encode(MessageType.REMOVE_ALL_IDENTITIES)
            )
            replies = [await client.read_frame() for _ in range(3)]
        assert replies == [
            answer_of(agent),
            agent.answer(MessageType.SIGN_REQUEST),
            FAILURE,
        ]

    async def test_large_identities_answer_is_relayed_intact(self, harness: Harness) -> None:
        """An answer over 64 KiB (hundreds of keys) arrives byte for byte."""
        keys = [f"key-{i:04d}-".encode() + b"k" * 300 for i in range(400)]
        agent = FakeAgent("many", keys=keys)
        harness.add(agent, "/a/many", 100, health=Health.HEALTHY)
        with trio.fail_after(5):
            reply = await identities(harness.open_client())
        assert len(reply) > 64 * 1024
        assert reply == encode(MessageType.IDENTITIES_ANSWER, identities_body(keys))

    async def test_extension_messages_pass_untouched(self, harness: Harness) -> None:
        """A session-bind extension request and its reply cross the proxy byte for byte."""
        agent = FakeAgent("a")
        harness.add(agent, "/a/1", 100, health=Health.HEALTHY)
        name = b"session-bind@openssh.com"
        raw = encode(MessageType.EXTENSION, struct.pack(">I", len(name)) + name + b"\x00" * 40)
        with trio.fail_after(5):
            client = harness.open_client()
            await client.stream.send_all(raw)
            reply = await client.read_frame()
        assert (agent.raw_requests, reply) == ([raw], encode(MessageType.SUCCESS))

    async def test_client_half_close_still_gets_the_reply(self, harness: Harness) -> None:
        """A client that sends a request and shuts its write side still gets its answer."""
        agent = FakeAgent("a")
        harness.add(agent, "/a/1", 100, health=Health.HEALTHY)
        with trio.fail_after(5):
            client = harness.open_client()
            await client.stream.send_all(encode(MessageType.REQUEST_IDENTITIES))
            await client.stream.send_eof()  # type: ignore[attr-defined]
            assert await client.read_frame() == answer_of(agent)
            assert await client.at_eof()  # then the proxy closes
            assert await harness.wait_outcomes(1) == ["ok"]

    async def test_each_client_gets_its_own_backend_connection(self, harness: Harness) -> None:
        """Three clients mean three upstream connections: nothing is shared or pooled."""
        agent = FakeAgent("a")
        harness.add(agent, "/a/1", 100, health=Health.HEALTHY)
        with trio.fail_after(5):
            clients = [harness.open_client() for _ in range(3)]
            for client in clients:
                await identities(client)
        assert agent.connections == 3

    async def test_a_hung_backend_does_not_delay_other_clients(self, harness: Harness) -> None:
        """While one client waits on a backend that never answers, another is served."""
        hung, good = FakeAgent("hung", behaviour=Behaviour.HANG), FakeAgent("good")
        hung_id = harness.add(hung, "/a/hung", 200, health=Health.HEALTHY)
        harness.add(good, "/a/good", 100, health=Health.HEALTHY)
        with trio.fail_after(5):
            stuck = harness.open_client()
            await stuck.stream.send_all(encode(MessageType.REQUEST_IDENTITIES))
            while not hung.requests:
                await hung.request_seen.wait()
            # The prober would now find it slow; slow ranks below healthy.
            harness.registry.record_probe(hung_id, ProbeResult(Health.SLOW))
            served = harness.open_client()
            assert await identities(served) == answer_of(good)
            await served.stream.aclose()
            # That one finished; the stuck client is still waiting, not failed.
            assert await harness.wait_outcomes(1) == ["ok"]


class TestFailover:
    @pytest.mark.parametrize(
        "behaviour", [None, Behaviour.CLOSE, Behaviour.GARBAGE, Behaviour.TRUNCATE]
    )
    async def test_failing_best_backend_is_replaced_unnoticed(
        self, harness: Harness, behaviour: Behaviour | None
    ) -> None:
        """Refused, closed, garbage or cut-off before any reply: the next backend answers."""
        bad = None if behaviour is None else FakeAgent("bad", behaviour=behaviour)
        good = FakeAgent("good")
        bad_id = harness.add(bad, "/a/bad", 200, health=Health.HEALTHY)
        harness.add(good, "/a/good", 100, health=Health.HEALTHY)
        with trio.fail_after(5):
            assert await identities(harness.open_client()) == answer_of(good)
        failed = harness.registry.get(bad_id)
        assert failed is not None
        assert failed.health is Health.DEAD

    async def test_every_request_so_far_is_replayed_in_order(self, harness: Harness) -> None:
        """Pipelined requests sent to a backend that died reach the next one in order."""
        bad = FakeAgent("bad", behaviour=Behaviour.TRUNCATE)
        good = FakeAgent("good")
        harness.add(bad, "/a/bad", 200, health=Health.HEALTHY)
        harness.add(good, "/a/good", 100, health=Health.HEALTHY)
        sent = [
            encode(MessageType.EXTENSION, b"\x00\x00\x00\x01x"),
            encode(MessageType.REQUEST_IDENTITIES),
            encode(MessageType.SIGN_REQUEST, b"data"),
        ]
        with trio.fail_after(5):
            client = harness.open_client()
            await client.stream.send_all(b"".join(sent))
            replies = [await client.read_frame() for _ in sent]
        assert good.raw_requests == sent
        assert replies == [
            good.answer(MessageType.EXTENSION),
            answer_of(good),
            good.answer(MessageType.SIGN_REQUEST),
        ]

    async def test_a_large_pipelined_burst_fails_over_whole(self, harness: Harness) -> None:
        """Over 1 MiB of pipelined requests sent before any reply are all answered, in order,
        by the next backend when the first one dies: nothing is lost or reordered."""
        bad = FakeAgent("bad", behaviour=Behaviour.TRUNCATE)
        good = FakeAgent("good")
        harness.add(bad, "/a/bad", 200, health=Health.HEALTHY)
        harness.add(good, "/a/good", 100, health=Health.HEALTHY)
        burst = [encode(MessageType.SIGN_REQUEST, bytes([i]) * (250 * 1024)) for i in range(5)]
        with trio.fail_after(5):
            client = harness.open_client()
            await client.stream.send_all(b"".join(burst))
            replies = [await client.read_frame() for _ in burst]
        assert good.raw_requests == burst
        assert replies == [good.answer(MessageType.SIGN_REQUEST)] * 5

    async def test_no_failover_once_a_reply_was_delivered(self, harness: Harness) -> None:
        """After a reply reached the client, losing the backend closes the client instead."""
        flaky = FakeAgent("flaky", behaviour=Behaviour.DIE_AFTER_FIRST)
        other = FakeAgent("other")
        harness.add(flaky, "/a/flaky", 200, health=Health.HEALTHY)
        harness.add(other, "/a/other", 100, health=Health.HEALTHY)
        with trio.fail_after(5):
            client = harness.open_client()
            assert await identities(client) == answer_of(flaky)
            await client.stream.send_all(encode(MessageType.REQUEST_IDENTITIES))
            assert await client.at_eof()
            assert await harness.wait_outcomes(1) == ["backend_lost"]
        assert other.connections == 0


class TestNoBackend:
    async def test_requests_fail_at_once_without_backends(self, harness: Harness) -> None:
        """With no backend, each request gets SSH_AGENT_FAILURE instead of hanging."""
        with trio.fail_after(5):
            client = harness.open_client()
            assert await identities(client) == FAILURE
            assert await identities(client) == FAILURE
        assert harness.rescans == 2  # every miss rescans once

    async def test_dead_backends_are_a_last_resort(self, harness: Harness) -> None:
        """A backend judged dead is tried only after the usable ones and a rescan; if it
        answers, it is healthy again."""
        refusing = harness.add(None, "/a/refusing", 300, health=Health.HEALTHY)
        judged_dead = FakeAgent("judged-dead")
        dead = harness.add(judged_dead, "/a/dead", 100, health=Health.DEAD)
        with trio.fail_after(5):
            client = harness.open_client()
            assert await identities(client) == answer_of(judged_dead)
            await client.stream.aclose()
            await harness.wait_outcomes(1)
        assert harness.backends.connects == ["/a/refusing", "/a/dead"]
        assert harness.rescans == 1
        revived, failed = harness.registry.get(dead), harness.registry.get(refusing)
        assert (revived and revived.health, failed and failed.health) == (
            Health.HEALTHY,
            Health.DEAD,
        )

    async def test_only_refusing_backends_mean_failure(self, harness: Harness) -> None:
        """When every backend, dead ones included, refuses, the client gets FAILURE."""
        harness.add(None, "/a/stale", 100, health=Health.DEAD)
        with trio.fail_after(5):
            assert await identities(harness.open_client()) == FAILURE
        assert harness.backends.connects == ["/a/stale"]

    async def test_a_miss_rescans_and_uses_what_appeared(self, harness: Harness) -> None:
        """A session that appeared since the last scan is found by the miss's rescan."""
        fresh = FakeAgent("fresh")
        harness.backends.agents["/a/fresh"] = fresh
        harness.on_rescan = [candidate("/a/fresh", 300)]
        with trio.fail_after(5):
            assert await identities(harness.open_client()) == answer_of(fresh)


class TestBadClients:
    @pytest.mark.parametrize(
        "data",
        [b"\x00\x00\x00\x00", struct.pack(">I", 256 * 1024 + 1) + b"\x0b"],
        ids=["zero-length", "oversized"],
    )
    async def test_bad_frame_closes_only_that_connection(
        self, harness: Harness, data: bytes
    ) -> None:
        """A zero-length or oversized frame closes the connection; the next client is served."""
        agent = FakeAgent("a")
        harness.add(agent, "/a/1", 100, health=Health.HEALTHY)
        with trio.fail_after(5):
            bad = harness.open_client()
            await bad.stream.send_all(data)
            assert await bad.at_eof()
            assert await identities(harness.open_client()) == answer_of(agent)
        assert agent.requests == [MessageType.REQUEST_IDENTITIES]

    async def test_client_vanishing_mid_request(self, harness: Harness) -> None:
        """A client that leaves after half a request ends its connection and nothing else."""
        agent = FakeAgent("a")
        harness.add(agent, "/a/1", 100, health=Health.HEALTHY)
        with trio.fail_after(5):
            client = harness.open_client()
            await client.stream.send_all(encode(MessageType.SIGN_REQUEST, b"x" * 100)[:50])
            await client.stream.aclose()
            assert await harness.wait_outcomes(1) == ["client_vanished_mid_request"]
            assert await identities(harness.open_client()) == answer_of(agent)


class TestLogs:
    async def test_payload_bytes_never_reach_the_log(self, harness: Harness) -> None:
        """A secret sent through ADD_IDENTITY and LOCK appears in no log field."""
        agent = FakeAgent("a")
        harness.add(agent, "/a/1", 100, health=Health.HEALTHY)
        secret = b"hunter2-SECRET-passphrase"
        with structlog.testing.capture_logs() as logs, trio.fail_after(5):
            client = harness.open_client()
            await client.request(MessageType.ADD_IDENTITY, secret)
            await client.request(MessageType.LOCK, secret)
            await client.stream.aclose()
            await harness.wait_outcomes(1)
        text = repr(logs)
        assert logs, "the connection must be logged"
        for form in (secret, secret.decode(), secret.hex(), repr(secret)):
            assert str(form) not in text
        closed = [e for e in logs if e["event"] == "switcher.proxy.connection_closed"]
        assert closed[0]["requests"] == {"ADD_IDENTITY": 1, "LOCK": 1}
