"""In-memory fake agents that speak real agent frames.

A fake is a real agent-protocol peer, not a mock: it decodes requests with
the same framing rules ssh-agent has and answers with well-formed replies
(or, on request, misbehaves in one of the ways real backends do).
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio
import trio.testing

from switcher.core import Backend, FrameDecoder, FrameError, MessageType, encode


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def identities_body(keys: Sequence[bytes]) -> bytes:
    """An IDENTITIES_ANSWER body: a count, then (key blob, comment) pairs."""
    return struct.pack(">I", len(keys)) + b"".join(
        _string(k) + _string(b"comment-" + k[:8]) for k in keys
    )


class Behaviour(enum.Enum):
    NORMAL = "normal"
    HANG = "hang"  # reads requests, never answers (an agent waiting on a touch)
    CLOSE = "close"  # accepts, then closes without reading (sshd with nothing forwarded)
    GARBAGE = "garbage"  # answers with an oversized length prefix
    TRUNCATE = "truncate"  # sends half a reply, then closes (an agent dying mid-reply)
    DIE_AFTER_FIRST = "die_after_first"  # answers one request, then closes
    DIE_ON_SIGN = "die_on_sign"  # healthy to probes, but cuts a signature short


async def serve_unix(
    serve: Callable[[trio.SocketStream], Awaitable[object]],
    path: str,
    *,
    task_status: trio.TaskStatus[trio.SocketListener] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on a real Unix socket at ``path``, ``serve`` each client, until cancelled."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        task_status.started(listener)
        async with listener:
            while True:
                stream = await listener.accept()
                nursery.start_soon(serve, stream)


@attrs.define(eq=False)
class FakeAgent:
    """An agent holding ``keys``; its SIGN_RESPONSE body is its own name, to tell agents apart."""

    name: str
    keys: list[bytes] = attrs.Factory(lambda: [b"key-one"])
    behaviour: Behaviour = Behaviour.NORMAL
    requests: list[int] = attrs.Factory(list)
    raw_requests: list[bytes] = attrs.Factory(list)
    connections: int = 0
    # Set each time a request arrives, for tests that wait on it.
    request_seen: trio.Event = attrs.Factory(trio.Event)

    def answer(self, message_type: int) -> bytes:
        if message_type == MessageType.REQUEST_IDENTITIES:
            return encode(MessageType.IDENTITIES_ANSWER, identities_body(self.keys))
        if message_type == MessageType.SIGN_REQUEST:
            return encode(MessageType.SIGN_RESPONSE, _string(self.name.encode()))
        if message_type == MessageType.EXTENSION:
            # What ssh-agent answers to session-bind@openssh.com.
            return encode(MessageType.SUCCESS)
        return encode(MessageType.FAILURE)

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until the peer leaves (as ssh-agent, requests in order)."""
        self.connections += 1
        async with stream:
            if self.behaviour is Behaviour.CLOSE:
                return
            decoder = FrameDecoder()
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return  # ssh-agent closes on EOF without answering
                    decoder.feed(data)
                    while (frame := decoder.next_frame()) is not None:
                        self.requests.append(frame.type)
                        self.raw_requests.append(frame.raw)
                        self.request_seen.set()
                        self.request_seen = trio.Event()
                        if not await self._reply(stream, frame.type):
                            return
            except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError):
                return

    async def _reply(self, stream: trio.abc.Stream, message_type: int) -> bool:
        if self.behaviour is Behaviour.HANG:
            await trio.sleep_forever()
        if self.behaviour is Behaviour.GARBAGE:
            await stream.send_all(b"\xff\xff\xff\xff garbage")
            return False
        reply = self.answer(message_type)
        if self.behaviour is Behaviour.TRUNCATE or (
            self.behaviour is Behaviour.DIE_ON_SIGN and message_type == MessageType.SIGN_REQUEST
        ):
            await stream.send_all(reply[: len(reply) // 2])
            return False
        await stream.send_all(reply)
        return self.behaviour is not Behaviour.DIE_AFTER_FIRST

    async def serve_unix(
        self,
        path: str,
        *,
        task_status: trio.TaskStatus[trio.SocketListener] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on a real Unix socket at ``path`` until cancelled."""
        await serve_unix(self.serve, path, task_status=task_status)


@attrs.define(eq=False)
class MemoryBackends:
    """A connector for the proxy that reaches fake agents over memory streams.

    ``agents`` maps a backend path to its fake; a path with no fake refuses
    the connection, like a stale socket file.
    """

    nursery: trio.Nursery
    agents: dict[str, FakeAgent] = attrs.Factory(dict)
    connects: list[str] = attrs.Factory(list)

    async def connect(self, backend: Backend) -> trio.abc.Stream:
        from switcher.core import BackendUnavailableError  # noqa: PLC0415

        self.connects.append(backend.path)
        agent = self.agents.get(backend.path)
        if agent is None:
            raise BackendUnavailableError("connection refused")
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(agent.serve, theirs)
        return ours


def make_socket_file(path: str) -> None:
    """A stale socket: bound once, its listener gone, so connecting is refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)


@attrs.define(eq=False)
class AgentClient:
    """The client side of an agent connection, reading whole reply frames."""

    stream: trio.abc.Stream
    decoder: FrameDecoder = attrs.Factory(FrameDecoder)

    async def read_frame(self) -> bytes:
        while (frame := self.decoder.next_frame()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("stream closed before a whole frame")
            self.decoder.feed(data)
        return frame.raw

    async def request(self, message_type: int, body: bytes = b"") -> bytes:
        """Send one request and read one whole reply frame (header included)."""
        await self.stream.send_all(encode(message_type, body))
        return await self.read_frame()

    async def at_eof(self) -> bool:
        """Whether the other side closed (with nothing more to read)."""
        return self.decoder.buffered == 0 and await self.stream.receive_some(1) == b""


class OnSign(enum.Enum):
    """What a :class:`SignFaultAgent` does with a SIGN_REQUEST."""

    HANG = "hang"  # never answers (a touch that never comes, a laptop gone to sleep)
    HOLD = "hold"  # answers once the test sets ``release``
    GARBAGE = "garbage"  # answers with an oversized length prefix, then closes
    TRUNCATE = "truncate"  # sends half the reply, then closes (dies mid-reply)


@attrs.define(eq=False)
class SignFaultAgent(FakeAgent):
    """An agent healthy to every probe that misbehaves only when asked to sign.

    The prober sends REQUEST_IDENTITIES, so the daemon ranks this agent
    healthy and routes signatures to it: the fault happens in the relay.
    """

    on_sign: OnSign = OnSign.HANG
    # Set when the first SIGN_REQUEST arrives (and stays set).
    sign_seen: trio.Event = attrs.Factory(trio.Event)
    release: trio.Event = attrs.Factory(trio.Event)

    async def _reply(self, stream: trio.abc.Stream, message_type: int) -> bool:
        if message_type != MessageType.SIGN_REQUEST:
            return await super()._reply(stream, message_type)
        self.sign_seen.set()
        if self.on_sign is OnSign.HANG:
            await trio.sleep_forever()
        if self.on_sign is OnSign.GARBAGE:
            await stream.send_all(b"\xff\xff\xff\xff garbage")
            return False
        reply = self.answer(message_type)
        if self.on_sign is OnSign.TRUNCATE:
            await stream.send_all(reply[: len(reply) // 2])
            return False
        await self.release.wait()
        await stream.send_all(reply)
        return True


SESSION_BIND = encode(
    MessageType.EXTENSION, _string(b"session-bind@openssh.com") + _string(b"hostkey") + b"\x00" * 8
)


@attrs.define(eq=False)
class LoopAgent:
    """A forwarded socket that leads back into the daemon, as ``ssh -A`` back into
    the same host makes one.

    Each connection to it is a channel that the inner ``ssh`` client serves by
    connecting to its own ``SSH_AUTH_SOCK`` (``target``: the daemon) and
    sending session-bind there first, synchronously: while it waits for that
    reply it serves no other channel (ssh's main loop is blocked). Then it
    passes bytes both ways. With ``looping`` False it stops leading back and
    answers like a plain agent (the inner session's agent changed).
    """

    target: str
    looping: bool = True
    plain: FakeAgent = attrs.Factory(lambda: FakeAgent("not-a-loop-any-more"))
    binds: int = 0
    # The inner ssh client's single thread: held while it waits for a bind reply.
    _blocked: trio.Lock = attrs.Factory(trio.Lock)

    async def serve(self, stream: trio.abc.Stream) -> None:
        if not self.looping:
            await self.plain.serve(stream)
            return
        async with stream:
            try:
                async with self._blocked:
                    upstream = await trio.open_unix_socket(self.target)
                    try:
                        self.binds += 1
                        await upstream.send_all(SESSION_BIND)
                        await AgentClient(upstream).read_frame()
                    except BaseException:
                        await upstream.aclose()
                        raise
                async with upstream, trio.open_nursery() as nursery:

                    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
                        with contextlib.suppress(
                            trio.BrokenResourceError, trio.ClosedResourceError
                        ):
                            while data := await source.receive_some(65536):
                                await sink.send_all(data)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(pump, stream, upstream)
                    nursery.start_soon(pump, upstream, stream)
            except (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def serve_unix(
        self,
        path: str,
        *,
        task_status: trio.TaskStatus[trio.SocketListener] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on a real Unix socket at ``path`` until cancelled."""
        await serve_unix(self.serve, path, task_status=task_status)
