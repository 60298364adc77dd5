"""Agent-protocol framing: the sans-I/O decoder, encode, and the small readers."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switcher.core._protocol import (
    FAILURE_FRAME,
    HEADER_LEN,
    MAX_MESSAGE_LEN,
    REQUEST_IDENTITIES_FRAME,
    Frame,
    FrameDecoder,
    FrameError,
    MessageType,
    encode,
    identities_count,
    type_name,
)

# A payload that must never show up in an error message or a repr; long and
# distinctive so that a partial leak would still be caught.
SECRET = b"hunter2-SECRET-passphrase-do-not-log"


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def drain(decoder: FrameDecoder) -> list[Frame]:
    """Take every complete frame the decoder holds now."""
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def feed_in_chunks(decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame]:
    """Feed chunk by chunk, draining after each; FrameError propagates."""
    frames: list[Frame] = []
    for chunk in chunks:
        decoder.feed(chunk)
        frames.extend(drain(decoder))
    return frames


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (clamped, sorted, duplicates allowed)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


class TestEncode:
    def test_layout(self) -> None:
        """A frame is a big-endian length counting the type byte and body, then type, then body."""
        assert encode(MessageType.SIGN_REQUEST, b"abc") == b"\x00\x00\x00\x04\x0dabc"

    def test_empty_body(self) -> None:
        """A message with no body is five bytes with length one."""
        assert encode(MessageType.REQUEST_IDENTITIES) == b"\x00\x00\x00\x01\x0b"

    def test_prebuilt_frames(self) -> None:
        """The module's ready-made FAILURE and REQUEST_IDENTITIES frames are the canonical bytes."""
        assert (FAILURE_FRAME, REQUEST_IDENTITIES_FRAME) == (
            b"\x00\x00\x00\x01\x05",
            b"\x00\x00\x00\x01\x0b",
        )

    def test_largest_message_encodes(self) -> None:
        """A body that makes the message exactly MAX_MESSAGE_LEN long is encoded."""
        raw = encode(MessageType.SIGN_RESPONSE, bytes(MAX_MESSAGE_LEN - 1))
        assert (len(raw), raw[:HEADER_LEN]) == (HEADER_LEN + MAX_MESSAGE_LEN, header(262144))

    def test_one_byte_over_is_refused(self) -> None:
        """A body one byte too long raises FrameError naming the size, not the payload."""
        body = SECRET + bytes(MAX_MESSAGE_LEN - len(SECRET))
        with pytest.raises(FrameError) as info:
            encode(MessageType.SIGN_RESPONSE, body)
        assert str(info.value) == "message of 262145 bytes exceeds 262144"


class TestFrame:
    def test_type_and_body(self) -> None:
        """A frame exposes its type byte and the body after it."""
        frame = Frame(encode(MessageType.EXTENSION, b"query"))
        assert (frame.type, frame.body) == (27, b"query")

    def test_repr_hides_payload(self) -> None:
        """A frame's repr carries none of its bytes."""
        frame = Frame(encode(MessageType.ADD_IDENTITY, SECRET))
        assert repr(frame) == "Frame()"


class TestFrameDecoder:
    def test_one_frame(self) -> None:
        """A whole frame fed at once comes out as one frame with nothing left buffered."""
        raw = encode(MessageType.SIGN_REQUEST, b"data")
        decoder = FrameDecoder()
        decoder.feed(raw)
        assert (drain(decoder), decoder.buffered) == ([Frame(raw)], 0)

    def test_joined_frames(self) -> None:
        """Several frames in one chunk come out separately, in order."""
        raws = [encode(13, b"one"), encode(11), encode(27, b"three")]
        decoder = FrameDecoder()
        decoder.feed(b"".join(raws))
        assert drain(decoder) == [Frame(r) for r in raws]

    def test_split_header_and_body(self) -> None:
        """A frame split inside its header and inside its body is reassembled."""
        raw = encode(MessageType.SIGN_RESPONSE, b"signature-bytes")
        decoder = FrameDecoder()
        assert feed_in_chunks(decoder, [raw[:2], raw[2:7]]) == []
        assert decoder.buffered == 7
        assert feed_in_chunks(decoder, [raw[7:]]) == [Frame(raw)]

    def test_byte_at_a_time(self) -> None:
        """Frames fed one byte at a time each appear exactly when their last byte arrives."""
        raws = [encode(12, b"\x00\x00\x00\x00"), encode(6)]
        stream = b"".join(raws)
        decoder = FrameDecoder()
        completed_at = []
        for offset in range(len(stream)):
            decoder.feed(stream[offset : offset + 1])
            completed_at += [(offset, f) for f in drain(decoder)]
        assert completed_at == [
            (len(raws[0]) - 1, Frame(raws[0])),
            (len(stream) - 1, Frame(raws[1])),
        ]

    def test_trailing_partial_frame_stays_buffered(self) -> None:
        """Bytes after the last whole frame wait in the buffer for the rest."""
        raw = encode(13, b"abc")
        decoder = FrameDecoder()
        decoder.feed(raw + raw[:6])
        assert (drain(decoder), decoder.buffered) == ([Frame(raw)], 6)

    def test_accepts_bytearray_and_memoryview(self) -> None:
        """feed takes any bytes-like object."""
        raw = encode(13, b"abc")
        decoder = FrameDecoder()
        decoder.feed(bytearray(raw[:3]))
        decoder.feed(memoryview(raw)[3:])
        assert drain(decoder) == [Frame(raw)]

    def test_exact_limit_accepted(self) -> None:
        """A message of exactly 256 KiB is a valid frame."""
        raw = encode(MessageType.SIGN_RESPONSE, bytes(MAX_MESSAGE_LEN - 1))
        decoder = FrameDecoder()
        decoder.feed(raw)
        assert (drain(decoder), decoder.buffered) == ([Frame(raw)], 0)

    def test_one_byte_over_limit_rejected_at_header(self) -> None:
        """A 256 KiB + 1 length prefix is refused as soon as the four header bytes are in."""
        decoder = FrameDecoder()
        decoder.feed(header(MAX_MESSAGE_LEN + 1))
        with pytest.raises(FrameError, match=r"^message length 262145 exceeds 262144$"):
            decoder.next_frame()

    def test_zero_length_rejected_at_header(self) -> None:
        """A zero length prefix is refused once the fourth header byte arrives, not before."""
        decoder = FrameDecoder()
        decoder.feed(b"\x00\x00\x00")
        assert decoder.next_frame() is None
        decoder.feed(b"\x00")
        with pytest.raises(FrameError, match=r"^zero-length message$"):
            decoder.next_frame()

    def test_custom_limit(self) -> None:
        """A decoder with a smaller limit accepts up to it and refuses one more."""
        decoder = FrameDecoder(max_len=8)
        decoder.feed(encode(13, bytes(7)))
        assert len(drain(decoder)) == 1
        decoder.feed(header(9))
        with pytest.raises(FrameError, match=r"^message length 9 exceeds 8$"):
            decoder.next_frame()

    def test_oversize_error_has_no_payload(self) -> None:
        """The error for an oversized frame names its length only, never any payload bytes."""
        decoder = FrameDecoder()
        decoder.feed(header(0x7FFFFFFF) + SECRET)
        with pytest.raises(FrameError) as info:
            decoder.next_frame()
        message = str(info.value)
        assert message == f"message length {0x7FFFFFFF} exceeds 262144"
        assert SECRET.decode() not in message
        assert SECRET.hex() not in message

    def test_oversize_body_is_not_waited_for(self) -> None:
        """An oversized frame is refused while only its header is buffered (no 256 KiB held)."""
        decoder = FrameDecoder()
        decoder.feed(header(MAX_MESSAGE_LEN * 4))
        assert decoder.buffered == HEADER_LEN
        with pytest.raises(FrameError):
            decoder.next_frame()


class TestIdentitiesCount:
    def test_count(self) -> None:
        """The key count is the leading uint32 of an IDENTITIES_ANSWER body."""
        frame = Frame(encode(MessageType.IDENTITIES_ANSWER, struct.pack(">I", 3) + b"keys..."))
        assert identities_count(frame) == 3

    def test_empty_list(self) -> None:
        """A locked agent's empty answer counts zero keys."""
        assert identities_count(Frame(encode(MessageType.IDENTITIES_ANSWER, bytes(4)))) == 0

    def test_wrong_type(self) -> None:
        """Any other message type is a FrameError naming the type, not the body."""
        frame = Frame(encode(MessageType.SIGN_RESPONSE, SECRET))
        with pytest.raises(FrameError) as info:
            identities_count(frame)
        assert str(info.value) == "expected IDENTITIES_ANSWER, got type SIGN_RESPONSE"

    def test_truncated(self) -> None:
        """An answer whose body is shorter than a uint32 is a FrameError."""
        frame = Frame(encode(MessageType.IDENTITIES_ANSWER, b"\x00\x01\x02"))
        with pytest.raises(FrameError, match=r"^truncated IDENTITIES_ANSWER$"):
            identities_count(frame)


class TestTypeName:
    @pytest.mark.parametrize(
        ("value", "name"),
        [
            (5, "FAILURE"),
            (11, "REQUEST_IDENTITIES"),
            (13, "SIGN_REQUEST"),
            (17, "ADD_IDENTITY"),
            (27, "EXTENSION"),
            (29, "EXTENSION_RESPONSE"),
        ],
    )
    def test_known(self, value: int, name: str) -> None:
        """A known type byte is logged by its authfd.h name."""
        assert type_name(value) == name

    @pytest.mark.parametrize("value", [0, 7, 24, 30, 255])
    def test_unknown_keeps_number(self, value: int) -> None:
        """An unknown type byte is logged as its decimal number."""
        assert type_name(value) == str(value)

    def test_values_match_authfd(self) -> None:
        """Every message type carries the number OpenSSH's authfd.h gives it."""
        assert {t.name: t.value for t in MessageType} == {
            "FAILURE": 5,
            "SUCCESS": 6,
            "REQUEST_IDENTITIES": 11,
            "IDENTITIES_ANSWER": 12,
            "SIGN_REQUEST": 13,
            "SIGN_RESPONSE": 14,
            "ADD_IDENTITY": 17,
            "REMOVE_IDENTITY": 18,
            "REMOVE_ALL_IDENTITIES": 19,
            "ADD_SMARTCARD_KEY": 20,
            "REMOVE_SMARTCARD_KEY": 21,
            "LOCK": 22,
            "UNLOCK": 23,
            "ADD_ID_CONSTRAINED": 25,
            "ADD_SMARTCARD_KEY_CONSTRAINED": 26,
            "EXTENSION": 27,
            "EXTENSION_FAILURE": 28,
            "EXTENSION_RESPONSE": 29,
        }


# -- properties ------------------------------------------------------------

_bodies = st.binary(max_size=64)
_frames = st.builds(encode, st.integers(0, 255), _bodies)
# Streams that mix valid frames with arbitrary bytes, so decoding gets both
# deep into a stream and into every kind of bad header.
_streams = st.lists(st.one_of(_frames, st.binary(max_size=16)), max_size=8).map(b"".join)
_cuts = st.lists(st.integers(0, 600), max_size=12)


def _decode_all(data: bytes, cuts: list[int], max_len: int) -> tuple[list[Frame], bool, int]:
    """Decode ``data`` fed in pieces; return frames, whether it failed, and bytes left."""
    decoder = FrameDecoder(max_len=max_len)
    frames: list[Frame] = []
    for chunk in split_at(data, cuts):
        decoder.feed(chunk)
        try:
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
        except FrameError:
            return frames, True, decoder.buffered
    return frames, False, decoder.buffered


class TestProperties:
    @settings(max_examples=200, deadline=None)
    @given(data=st.one_of(_streams, st.binary(max_size=256)), cuts=_cuts)
    def test_frames_reassemble_the_input(self, data: bytes, cuts: list[int]) -> None:
        """Frames decoded from any split of any bytes concatenate exactly to the consumed prefix."""
        frames, failed, left = _decode_all(data, cuts, MAX_MESSAGE_LEN)
        consumed = b"".join(f.raw for f in frames)
        assert data.startswith(consumed)
        if not failed:
            assert len(consumed) + left == len(data)
        for frame in frames:
            (length,) = struct.unpack(">I", frame.raw[:HEADER_LEN])
            assert 1 <= length <= MAX_MESSAGE_LEN
            assert len(frame.raw) == HEADER_LEN + length

    @settings(max_examples=200, deadline=None)
    @given(
        data=st.one_of(_streams, st.binary(max_size=256)),
        cuts=_cuts,
        max_len=st.integers(1, 80),
    )
    def test_split_does_not_matter(self, data: bytes, cuts: list[int], max_len: int) -> None:
        """Any split of a stream decodes to the same frames and the same failure as one feed."""
        assert _decode_all(data, cuts, max_len)[:2] == _decode_all(data, [], max_len)[:2]

    @settings(max_examples=200, deadline=None)
    @given(message_type=st.integers(0, 255), body=st.binary(max_size=2048), cuts=_cuts)
    def test_encode_decode_round_trip(
        self, message_type: int, body: bytes, cuts: list[int]
    ) -> None:
        """Whatever encode makes, the decoder gives back with the same type and body."""
        raw = encode(message_type, body)
        frames = feed_in_chunks(FrameDecoder(), split_at(raw, cuts))
        assert [(f.raw, f.type, f.body) for f in frames] == [(raw, message_type, body)]

    @settings(max_examples=200, deadline=None)
    @given(messages=st.lists(st.tuples(st.integers(0, 255), _bodies), max_size=10), cuts=_cuts)
    def test_stream_round_trip(self, messages: list[tuple[int, bytes]], cuts: list[int]) -> None:
        """A stream of encoded messages decodes to the same messages, in order, in any split."""
        stream = b"".join(encode(t, b) for t, b in messages)
        decoder = FrameDecoder()
        frames = feed_in_chunks(decoder, split_at(stream, cuts))
        assert ([(f.type, f.body) for f in frames], decoder.buffered) == (messages, 0)
