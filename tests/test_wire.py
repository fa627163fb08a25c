"""Frames and request validation, without a network."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllm_p2p import wire


class ChunkedStream:
    """A stream double whose read(n) returns at most ``chunk`` bytes, like py-libp2p's."""

    def __init__(self, data: bytes, chunk: int = 3) -> None:
        self.data = data
        self.chunk = chunk
        self.reads = 0

    async def read(self, n: int | None = None) -> bytes:
        self.reads += 1
        size = min(self.chunk, n or self.chunk)
        out, self.data = self.data[:size], self.data[size:]
        return out


def test_request_frame_bytes_match_the_protocol_doc() -> None:
    # The byte-level example in docs/PROTOCOL.md.
    frame = wire.encode_frame({"prompt": "Hi", "max_new_tokens": 5})
    assert frame.hex(" ") == "1b 82 a6 70 72 6f 6d 70 74 a2 48 69 ae 6d 61 78 5f 6e 65 77 5f 74 6f 6b 65 6e 73 05"


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16384, 2**32])
def test_uvarint_round_trip(value: int) -> None:
    encoded = wire.encode_uvarint(value)
    assert len(encoded) == max(1, (value.bit_length() + 6) // 7)


async def test_frames_are_reassembled_from_short_reads() -> None:
    messages = [{"type": "token", "text": "é" * 200}, {"type": "done", "text": "x"}]
    stream = ChunkedStream(b"".join(wire.encode_frame(m) for m in messages))
    reader = wire.FrameReader(stream, wire.MAX_RESPONSE_FRAME)
    assert [await reader.read_frame(), await reader.read_frame()] == messages
    assert await reader.read_frame() is None


async def test_oversized_length_is_refused_before_reading_the_body() -> None:
    stream = ChunkedStream(wire.encode_uvarint(2**30) + b"\x00" * 10, chunk=4)
    reader = wire.FrameReader(stream, wire.MAX_REQUEST_FRAME)
    with pytest.raises(wire.FrameTooLarge) as info:
        await reader.read_frame()
    assert info.value.code == "too_large"
    assert stream.reads == 1  # it never asked for the gigabyte


@pytest.mark.parametrize(
    "data, error",
    [
        (b"\x05ab", wire.IncompleteFrame),  # body cut short
        (b"\x80", wire.IncompleteFrame),  # length prefix cut short
        (b"\x01\xc1", wire.WireError),  # 0xc1 is never valid msgpack
        (b"\x01\x05", wire.WireError),  # valid msgpack, but not a map
    ],
)
async def test_broken_frames_raise(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        await wire.FrameReader(ChunkedStream(data), 1024).read_frame()


async def test_non_string_map_keys_are_refused() -> None:
    body = msgpack.packb({1: "x"})
    with pytest.raises(wire.WireError):
        await wire.FrameReader(ChunkedStream(wire.encode_uvarint(len(body)) + body), 1024).read_frame()


def test_valid_request_parses_with_defaults() -> None:
    req = wire.parse_request({"prompt": "hello", "max_new_tokens": 8, "temperature": 0, "stream": True})
    assert req == wire.Request(prompt="hello", max_new_tokens=8, temperature=0.0, stream=True)
    assert wire.parse_request(req.to_wire()) == req


@pytest.mark.parametrize(
    "message, code, fragment",
    [
        ({}, "bad_request", "'prompt' is required"),
        ({"prompt": 5}, "bad_request", "'prompt' must be a string"),
        ({"prompt": "x", "color": "red"}, "bad_request", "unknown request keys: color"),
        ({"prompt": "x", "max_new_tokens": "5"}, "bad_request", "'max_new_tokens' must be an integer"),
        ({"prompt": "x", "max_new_tokens": True}, "bad_request", "'max_new_tokens' must be an integer"),
        ({"prompt": "x", "max_new_tokens": 0}, "bad_request", "between 1 and"),
        ({"prompt": "x", "temperature": float("nan")}, "bad_request", "'temperature'"),
        ({"prompt": "x", "top_p": 0}, "bad_request", "'top_p' must be greater than 0"),
        ({"prompt": "x", "stream": "yes"}, "bad_request", "'stream' must be a boolean"),
        ({"prompt": "x", "keep_alive": 1}, "bad_request", "'keep_alive' must be a boolean"),
        ({"prompt": "x" * (wire.MAX_PROMPT_CHARS + 1)}, "too_large", "longer than"),
    ],
)
def test_bad_requests_name_the_problem(message: dict, code: str, fragment: str) -> None:
    with pytest.raises(wire.WireError) as info:
        wire.parse_request(message)
    assert info.value.code == code
    assert fragment in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
async def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    reader = wire.FrameReader(ChunkedStream(data, chunk=7), 128)
    try:
        while (frame := await reader.read_frame()) is not None:
            assert isinstance(frame, dict)
            try:
                wire.parse_request(frame)
            except wire.WireError:
                pass
    except wire.WireError as exc:
        assert exc.code in wire.ERROR_CODES


def test_multistream_proposal_is_the_two_standard_lines() -> None:
    # multistream-select 1.0: each message is a uvarint length, the text, a newline.
    assert wire.multistream_proposal("/dllm/generate/1.0.0") == b"\x13/multistream/1.0.0\n\x15/dllm/generate/1.0.0\n"
