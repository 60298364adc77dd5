"""Fuzzing the relay: arbitrary client bytes, split arbitrarily, through ``relay_connection``.

The client side is a memory stream, the backends are fake agents reached
over memory streams, and time is virtual (the autojump clock), so a hang
shows up at once as a ``TooSlowError`` instead of a stuck test run.

What a client gets back is compared with a model. Each write of the client
is read by the proxy on its own (the test lets everything settle between
writes, as a client that waits for its answer does). Every whole request
in a write before the one that carries garbage (a zero-length or oversized
length prefix) must be answered, in order. Requests in the same write as
the garbage may go unanswered: ssh-agent itself drops them (measured on
OpenSSH 9.2: it closes the connection before writing the replies queued
from that read), so the proxy is allowed to as well, though never to answer
them out of order or in part.
"""

from __future__ import annotations

import itertools

import attrs
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import Behaviour, FakeAgent, MemoryBackends
from switcher.core import (
    Candidate,
    ConnectionResult,
    FrameDecoder,
    FrameError,
    Health,
    Layout,
    MessageType,
    Outcome,
    ProbeResult,
    Registry,
    encode,
    relay_connection,
)

# Virtual seconds: with the autojump clock a deadlock trips this at once.
_HANG_GUARD = 600

# Every outcome relay_connection may report (docs/RELIABILITY.md).
_OUTCOMES = frozenset(
    {
        Outcome.OK,
        Outcome.CLOSED_IDLE,
        Outcome.NO_BACKEND,
        Outcome.BACKEND_LOST,
        Outcome.CLIENT_VANISHED,
        Outcome.CLIENT_VANISHED_MID_REQUEST,
    }
)

_bodies = st.binary(max_size=64)
_frames = st.builds(encode, st.integers(0, 255), _bodies)
_garbage_headers = st.sampled_from([b"\x00\x00\x00\x00", b"\x00\x04\x00\x01", b"\xff\xff\xff\xff"])
# Where a run of valid frames stops: nothing, a bad header, any bytes, or half a frame.
_tails = st.one_of(
    st.just(b""),
    _garbage_headers,
    st.binary(min_size=1, max_size=12),
    _frames.map(lambda f: f[: len(f) - 1]),
)
# Mostly valid frames with a tail (and maybe frames after it, never answered);
# sometimes just any bytes.
_streams = st.one_of(
    st.tuples(st.lists(_frames, max_size=8), _tails, st.lists(_frames, max_size=3)).map(
        lambda t: b"".join(t[0]) + t[1] + b"".join(t[2])
    ),
    st.binary(max_size=300),
)
_cuts = st.lists(st.integers(0, 700), max_size=12)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets, without empty pieces."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@attrs.frozen
class Expected:
    """What the model says a client writing ``writes`` must get."""

    answered: list[int]  # request types that must be answered, in order
    maybe: list[int]  # requests sharing a write with the garbage: answered or not
    outcome: Outcome
    reason: str | None = None


def model(writes: list[bytes]) -> Expected:
    decoder = FrameDecoder()
    answered: list[int] = []
    for data in writes:
        decoder.feed(data)
        this_write: list[int] = []
        try:
            while (frame := decoder.next_frame()) is not None:
                this_write.append(frame.type)
        except FrameError as exc:
            return Expected(answered, this_write, Outcome.BAD_REQUEST, str(exc))
        answered += this_write
    if decoder.buffered:
        return Expected(answered, [], Outcome.CLIENT_VANISHED_MID_REQUEST)
    return Expected(answered, [], Outcome.OK if answered else Outcome.CLOSED_IDLE)


def _registry_with(paths: list[str]) -> Registry:
    """A registry holding healthy backends at ``paths``, the first one newest."""
    registry = Registry()
    candidates = [
        Candidate(path=p, layout=Layout.TMP, dev=1, ino=i + 1, ctime=1000.0 - i)
        for i, p in enumerate(paths)
    ]
    registry.reconcile(candidates)
    for backend in registry.snapshot().backends:
        registry.record_probe(backend.id, ProbeResult(Health.HEALTHY))
    return registry


async def _no_rescan() -> None:
    pass


async def converse(
    writes: list[bytes], agents: dict[str, FakeAgent]
) -> tuple[ConnectionResult, list[bytes]]:
    """Write ``writes`` one by one, letting all settle in between, then half-close and read
    everything; return how the relay ended and the whole frames the client got."""
    registry = _registry_with(list(agents))
    results: list[ConnectionResult] = []
    with trio.fail_after(_HANG_GUARD):
        async with trio.open_nursery() as nursery:
            backends = MemoryBackends(nursery, dict(agents))
            ours, theirs = trio.testing.memory_stream_pair()

            async def relay() -> None:
                results.append(
                    await relay_connection(
                        theirs, registry=registry, connect=backends.connect, rescan=_no_rescan
                    )
                )

            nursery.start_soon(relay)
            try:
                for data in writes:
                    await ours.send_all(data)
                    await trio.testing.wait_all_tasks_blocked()
                await ours.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the proxy closed on us: what we got so far is the answer
            received = b""
            while chunk := await ours.receive_some(65536):
                received += chunk
            await ours.aclose()
            while not results:
                await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # backends still serving closed connections
    decoder = FrameDecoder()
    decoder.feed(received)
    replies = []
    while (frame := decoder.next_frame()) is not None:
        replies.append(frame.raw)
    assert decoder.buffered == 0, "the client got part of a frame"
    return results[0], replies


def _run(writes: list[bytes], agents: dict[str, FakeAgent]) -> tuple[ConnectionResult, list[bytes]]:
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(converse, writes, agents, clock=clock)


class TestProxyFuzz:
    @settings(max_examples=200, deadline=None)
    @given(data=_streams, cuts=_cuts)
    def test_any_client_bytes_end_with_the_answers_owed(self, data: bytes, cuts: list[int]) -> None:
        """Any byte stream in any split ends the connection with the outcome the model
        predicts, every whole request before the garbage's write answered in order."""
        agent = FakeAgent("agent")
        writes = split_at(data, cuts)
        expected = model(writes)
        result, replies = _run(writes, {"/a/agent": agent})
        owed = [agent.answer(t) for t in expected.answered]
        optional = [agent.answer(t) for t in expected.maybe]
        assert (result.outcome, result.reason) == (expected.outcome, expected.reason)
        assert replies[: len(owed)] == owed
        assert replies[len(owed) :] == optional[: len(replies) - len(owed)]

    @settings(max_examples=150, deadline=None)
    @given(
        data=_streams,
        cuts=_cuts,
        behaviour=st.sampled_from(
            [
                Behaviour.NORMAL,
                Behaviour.CLOSE,
                Behaviour.GARBAGE,
                Behaviour.TRUNCATE,
                Behaviour.DIE_AFTER_FIRST,
                Behaviour.DIE_ON_SIGN,
            ]
        ),
    )
    def test_misbehaving_first_backend_never_breaks_the_relay(
        self, data: bytes, cuts: list[int], behaviour: Behaviour
    ) -> None:
        """Whatever the client sends and however the first backend misbehaves, the
        relay ends with a known outcome, whole reply frames only, and no exception."""
        first = FakeAgent("first", behaviour=behaviour)
        second = FakeAgent("second")
        writes = split_at(data, cuts)
        expected = model(writes)
        result, replies = _run(writes, {"/a/first": first, "/a/second": second})
        assert result.outcome in _OUTCOMES or result.outcome == expected.outcome
        answers = {
            agent.answer(t)
            for agent in (first, second)
            for t in [*expected.answered, *expected.maybe]
        }
        answers.add(encode(MessageType.FAILURE))
        assert set(replies) <= answers
        assert len(replies) <= len(expected.answered) + len(expected.maybe)
