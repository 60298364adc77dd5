"""Loop detection: does an agent socket lead back into switcher itself?

``ssh -A`` from inside a session back into this host (or through any hop
whose agent ends at this switcher) makes a forwarded socket here whose
agent is switcher itself. Relaying into it would wait on ourselves.

The check is positive, not a guess from timing: the prober (and the relay,
before it first uses an agent nobody has checked yet) sends the agent an
``SSH_AGENTC_EXTENSION`` named ``loop-check@switcher`` carrying a nonce that
starts with this daemon's random token. A real agent answers FAILURE (an
extension it does not know). If the socket leads back here, the request
arrives at our own socket instead: the relay recognises the token, answers
FAILURE at once, so the chain unwinds, and records the nonce before that
reply starts back down the chain. So when the checker gets its reply, it
knows whether its nonce came back.

The one request of the chain that waits for an answer before anything
else moves is session-bind: the inner ``ssh`` sends it to its agent (us)
on every forwarded channel it opens, and serves nothing until answered.
So a session-bind never goes to an agent nobody has checked yet (it may be
that very ssh's socket); every other request may wait for a check, since
the chain completes once its binds are answered.
"""

from __future__ import annotations

import collections
import secrets
import struct

import attrs
import trio

from switcher.core._protocol import HEADER_LEN, Frame, FrameDecoder, MessageType, encode
from switcher.core._relaysocket import RelayStream

# The extension's name: one of our own (PROTOCOL.agent: name@domain).
LOOP_CHECK_NAME = b"loop-check@switcher"
# What ssh sends first on every agent connection it opens for a forwarded
# channel, and waits for before it serves any other.
SESSION_BIND_NAME = b"session-bind@openssh.com"
# What ``ctl list`` and the log say about an agent whose check came back.
LOOP_REASON = "leads back to switcher"

# Random bytes that make a nonce ours, and random bytes per check after them.
_TOKEN_LEN = 16
_SERIAL_LEN = 8
_U32 = struct.Struct(">I")


def _string(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _extension(raw: bytes) -> tuple[bytes, bytes] | None:
    """An EXTENSION request's name and the string after it, if it has both."""
    body = memoryview(raw)[HEADER_LEN + 1 :]
    strings = []
    for _ in range(2):
        if len(body) < _U32.size:
            return None
        (length,) = _U32.unpack_from(body)
        if len(body) < _U32.size + length:
            return None
        strings.append(bytes(body[_U32.size : _U32.size + length]))
        body = body[_U32.size + length :]
    return strings[0], strings[1]


def is_session_bind(raw: bytes) -> bool:
    """Whether a request frame is ``session-bind@openssh.com``."""
    if raw[HEADER_LEN] != MessageType.EXTENSION:
        return False
    parsed = _extension(raw)
    return parsed is not None and parsed[0] == SESSION_BIND_NAME


@attrs.define(eq=False)
class LoopGuard:
    """The nonces this daemon sent, and the agents it is checking right now."""

    _token: bytes = attrs.Factory(lambda: secrets.token_bytes(_TOKEN_LEN))
    _pending: set[bytes] = attrs.Factory(set)
    _came_back: set[bytes] = attrs.Factory(set)
    # Per agent path, how many checks are in flight, and an event set when none is.
    _checking: collections.Counter[str] = attrs.Factory(collections.Counter)
    _checked: dict[str, trio.Event] = attrs.Factory(dict)

    def checking(self, path: str) -> bool:
        """Whether a check of the agent at ``path`` is in flight."""
        return path in self._checking

    async def wait_checked(self, path: str) -> None:
        """Wait until no check of the agent at ``path`` is in flight."""
        if path in self._checking:
            await self._checked[path].wait()

    def claims(self, frame: Frame) -> bool:
        """Whether ``frame`` is one of our own checks, come back: answer it FAILURE.

        Another switcher's check (another token) is not ours: it is relayed.
        """
        if frame.type != MessageType.EXTENSION:
            return False
        parsed = _extension(frame.raw)
        if parsed is None:
            return False
        name, nonce = parsed
        if name != LOOP_CHECK_NAME or not nonce.startswith(self._token):
            return False
        if nonce in self._pending:
            self._came_back.add(nonce)
        return True

    async def check(self, stream: RelayStream, path: str) -> bool:
        """Send a check to the agent at ``path`` over ``stream`` (a fresh connection).

        True if it came back to us (a loop), False if the agent answered
        without it doing so. Raises ``BrokenResourceError`` if the agent
        closed instead of answering (some agents hang up on what they do not
        know; a loop through us never does).
        """
        nonce = self._token + secrets.token_bytes(_SERIAL_LEN)
        self._pending.add(nonce)
        self._checking[path] += 1
        self._checked.setdefault(path, trio.Event())
        try:
            await stream.send_all(
                encode(MessageType.EXTENSION, _string(LOOP_CHECK_NAME) + _string(nonce))
            )
            decoder = FrameDecoder()
            while decoder.next_frame() is None:
                data = await stream.receive_some(4096)
                if not data:
                    raise trio.BrokenResourceError("closed instead of answering the loop check")
                decoder.feed(data)
            return nonce in self._came_back
        finally:
            self._pending.discard(nonce)
            self._came_back.discard(nonce)
            self._checking[path] -= 1
            if not self._checking[path]:
                del self._checking[path]
                self._checked.pop(path).set()
