"""The SSH agent wire format: framing only, no I/O.

Every message, both ways, is ``uint32 length`` (big-endian, counting the type
byte and the contents but not itself), then ``byte type``, then contents
(RFC 9987; OpenSSH ``PROTOCOL.agent``). The proxy never looks inside a
message beyond its type byte: contents carry private keys and passphrases.
"""

from __future__ import annotations

import enum
import struct

import attrs

# ssh-agent drops a client whose request exceeds AGENT_MAX_LEN (ssh-agent.c),
# and OpenSSH clients refuse replies over MAX_AGENT_REPLY_LEN (authfd.c); both
# are 256 KiB, so nothing larger is a message any OpenSSH peer would accept.
MAX_MESSAGE_LEN = 256 * 1024

HEADER_LEN = 4
_HEADER = struct.Struct(">I")


class MessageType(enum.IntEnum):
    """Message types from OpenSSH ``authfd.h``."""

    FAILURE = 5
    SUCCESS = 6
    REQUEST_IDENTITIES = 11
    IDENTITIES_ANSWER = 12
    SIGN_REQUEST = 13
    SIGN_RESPONSE = 14
    ADD_IDENTITY = 17
    REMOVE_IDENTITY = 18
    REMOVE_ALL_IDENTITIES = 19
    ADD_SMARTCARD_KEY = 20
    REMOVE_SMARTCARD_KEY = 21
    LOCK = 22
    UNLOCK = 23
    ADD_ID_CONSTRAINED = 25
    ADD_SMARTCARD_KEY_CONSTRAINED = 26
    EXTENSION = 27
    EXTENSION_FAILURE = 28
    EXTENSION_RESPONSE = 29


# Every possible type byte's log name, computed once: the relay names each
# request it counts, and an enum lookup per message showed up in profiles.
_KNOWN_TYPES = {message_type.value: message_type.name for message_type in MessageType}
_TYPE_NAMES = tuple(_KNOWN_TYPES.get(t, str(t)) for t in range(256))


def type_name(message_type: int) -> str:
    """A log-friendly name for a type byte; unknown types keep their number."""
    return _TYPE_NAMES[message_type]


class FrameError(Exception):
    """The peer sent something that is not a valid agent message.

    The message names the problem only, never any bytes of the payload.
    """


@attrs.frozen
class Frame:
    """One whole message as it appeared on the wire, header included.

    Keeping the raw bytes lets the proxy forward (and, on failover, replay)
    a message without re-encoding it.
    """

    raw: bytes = attrs.field(repr=False)  # never let a payload reach a repr or a log

    @property
    def type(self) -> int:
        return self.raw[HEADER_LEN]

    @property
    def body(self) -> bytes:
        return self.raw[HEADER_LEN + 1 :]


def encode(message_type: int, body: bytes = b"") -> bytes:
    """Frame a message: length prefix, type byte, body."""
    if len(body) + 1 > MAX_MESSAGE_LEN:
        raise FrameError(f"message of {len(body) + 1} bytes exceeds {MAX_MESSAGE_LEN}")
    return _HEADER.pack(len(body) + 1) + bytes((message_type,)) + body


FAILURE_FRAME = encode(MessageType.FAILURE)
REQUEST_IDENTITIES_FRAME = encode(MessageType.REQUEST_IDENTITIES)


class FrameDecoder:
    """Splits a byte stream into whole frames; sans-I/O.

    Feed it whatever arrived with :meth:`feed`, then take complete frames
    with :meth:`next_frame` until it returns ``None``. A zero-length or
    oversized length prefix raises :class:`FrameError` as soon as the four
    header bytes are in, before the body is buffered, so a hostile peer can
    make us hold at most one maximal message.
    """

    def __init__(self, max_len: int = MAX_MESSAGE_LEN) -> None:
        self._max_len = max_len
        self._buffer = bytearray()
        self._need: int | None = None  # total bytes of the frame being assembled

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | None:
        if self._need is None:
            if len(self._buffer) < HEADER_LEN:
                return None
            (length,) = _HEADER.unpack_from(self._buffer)
            if length == 0:
                raise FrameError("zero-length message")
            if length > self._max_len:
                raise FrameError(f"message length {length} exceeds {self._max_len}")
            self._need = HEADER_LEN + length
        if len(self._buffer) < self._need:
            return None
        raw = bytes(self._buffer[: self._need])
        del self._buffer[: self._need]
        self._need = None
        return Frame(raw)


def identities_count(frame: Frame) -> int:
    """The number of keys in an IDENTITIES_ANSWER (its leading uint32)."""
    if frame.type != MessageType.IDENTITIES_ANSWER:
        raise FrameError(f"expected IDENTITIES_ANSWER, got type {type_name(frame.type)}")
    body = frame.body
    if len(body) < HEADER_LEN:
        raise FrameError("truncated IDENTITIES_ANSWER")
    (count,) = _HEADER.unpack_from(body)
    return int(count)
