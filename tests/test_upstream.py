"""Choosing an agent for a client while sessions come and go under it."""

from __future__ import annotations

import trio
import trio.testing

from switcher.core import Backend, BackendUnavailableError, Candidate, Layout, Registry
from switcher.core._registry import Health, ProbeResult
from switcher.core._relaysocket import RelayStream
from switcher.core._upstream import attach


def candidate(path: str, ino: int) -> Candidate:
    """A forwarded session's socket; a higher ``ino`` is a newer session."""
    return Candidate(path, Layout.TMP, 1, ino, float(ino))


class TestSessionsThatComeAndGo:
    async def test_a_session_that_appears_while_another_fails_is_tried(self) -> None:
        """Each agent vanishes while the client connects to it, and a newer session
        appears meanwhile: the client ends up with the newest, never with nothing."""
        registry = Registry()
        sessions = ["/s/a", "/s/b", "/s/c"]

        def only_session(path: str) -> None:
            registry.reconcile([candidate(path, sessions.index(path) + 1)])
            for probed in registry.snapshot().backends:
                registry.record_probe(probed.id, ProbeResult(Health.HEALTHY))

        only_session(sessions[0])
        stream, _ = trio.testing.memory_stream_pair()

        async def connect(backend: Backend) -> RelayStream:
            path = backend.path
            if path == sessions[-1]:
                return stream
            # While we connect, its session ends and the next one starts.
            only_session(sessions[sessions.index(path) + 1])
            await trio.lowlevel.checkpoint()
            raise BackendUnavailableError("socket vanished")

        async def rescan() -> None:
            await trio.lowlevel.checkpoint()

        with trio.fail_after(10):
            chosen = await attach(registry, connect, rescan, set())
        assert chosen is not None
        assert (chosen[0].path, chosen[1]) == ("/s/c", stream)
