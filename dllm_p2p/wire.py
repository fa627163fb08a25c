"""Frames and messages of the dllm wire protocol (see docs/PROTOCOL.md).

A frame is an unsigned LEB128 varint byte length followed by that many bytes of one
msgpack map. This is libp2p's usual length-prefixed convention, so any implementation
with a varint and a msgpack library can speak it.

Everything here is transport-agnostic: a ``FrameReader`` only needs an object with an
``async read(n) -> bytes`` method, which py-libp2p streams and test doubles both have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

GENERATE_PROTOCOL = "/dllm/generate/1.0.0"
INFO_PROTOCOL = "/dllm/info/1.0.0"
SCORE_PROTOCOL = "/dllm/score/1.0.0"
FORWARD_PROTOCOL = "/dllm/forward/1.0.0"
LEDGER_PROTOCOL = "/dllm/ledger/1.0.0"

#: Largest request frame a worker reads. The length prefix is checked before the body is
#: read, so a peer announcing a gigabyte frame costs us nothing.
MAX_REQUEST_FRAME = 64 * 1024
#: Largest frame a client accepts from a worker (token and final frames are far smaller).
MAX_RESPONSE_FRAME = 1024 * 1024
#: Longest prompt, in characters, that passes validation (the model's context is the
#: tighter limit in practice; this bound keeps tokenization cheap).
MAX_PROMPT_CHARS = 32 * 1024
MAX_NEW_TOKENS_LIMIT = 4096
MAX_TOP_K = 1_000_000
#: Seconds a worker keeps a ``keep_alive`` stream open waiting for the next request.
KEEP_ALIVE_IDLE = 30.0
_MAX_VARINT_BYTES = 10

ERROR_CODES = frozenset({"bad_request", "too_large", "unknown_model", "busy", "payment_required", "timeout", "internal"})


class WireError(Exception):
    """A peer broke the protocol; ``code`` is the error code to answer with."""

    code = "bad_request"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class FrameTooLarge(WireError):
    code = "too_large"


class IncompleteFrame(WireError):
    """The stream ended in the middle of a frame."""


class _Readable(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise ValueError("uvarint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(message: dict[str, Any]) -> bytes:
    return frame_of(msgpack.packb(message, use_bin_type=True))


def frame_of(body: bytes) -> bytes:
    """A frame around an already encoded body."""
    return encode_uvarint(len(body)) + body


#: multistream-select's own protocol id, the first line either side sends on a new stream.
MULTISTREAM_PROTOCOL = "/multistream/1.0.0"


def multistream_line(text: str) -> bytes:
    """One multistream-select message: uvarint length, the text, a newline."""
    data = text.encode() + b"\n"
    return encode_uvarint(len(data)) + data


def multistream_proposal(protocol: str) -> bytes:
    """What a dialer sends to open a stream speaking ``protocol``.

    Sent together with the request frame, this is multistream-select's lazy (pipelined)
    negotiation, as go-libp2p does for a single proposed protocol: the listener reads the
    two lines, echoes them, and the request is already waiting in the stream. It saves the
    two round trips of the usual propose-and-wait exchange (about 2 ms per request between
    two py-libp2p processes, measured). If the protocol is refused the listener answers
    ``na`` and resets.
    """
    return multistream_line(MULTISTREAM_PROTOCOL) + multistream_line(protocol)


def decode_body(body: bytes) -> dict[str, Any]:
    """Unpack one frame body; anything but a msgpack map with string keys is refused."""
    try:
        message = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
        )  # msgpack bounds container sizes by len(body) itself
    except (ValueError, msgpack.UnpackException, RecursionError, TypeError) as exc:
        raise WireError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise WireError(f"frame must be a msgpack map, got {type(message).__name__}")
    return message


class FrameReader:
    """Reads whole frames from a stream whose ``read(n)`` may return fewer bytes than asked."""

    def __init__(self, stream: _Readable, max_frame: int) -> None:
        self._stream = stream
        self._max_frame = max_frame
        self._buffer = bytearray()
        self._eof = False
        self.last_body = b""

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at end of stream."""
        if self._eof:
            return False
        try:
            chunk = await self._stream.read(max(self._max_frame, 4096))
        except EOFError:  # py-libp2p's StreamEOF subclasses EOFError
            chunk = b""
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    async def read_frame(self) -> dict[str, Any] | None:
        """The next frame's map, or None when the stream ended cleanly between frames."""
        body = await self.read_body()
        return None if body is None else decode_body(body)

    async def read_body(self) -> bytes | None:
        """The next length-prefixed message's bytes, undecoded (None at a clean end).

        The last body read stays in ``last_body``: a worker signs the hash of the exact
        request bytes it answered."""
        length = await self._read_length()
        if length is None:
            return None
        while len(self._buffer) < length:
            if not await self._fill():
                raise IncompleteFrame(f"stream ended after {len(self._buffer)} of {length} bytes")
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        self.last_body = body
        return body

    async def _read_length(self) -> int | None:
        value = shift = index = 0
        while True:
            while index >= len(self._buffer):
                if not await self._fill():
                    if index == 0:
                        return None
                    raise IncompleteFrame("stream ended inside a length prefix")
            byte = self._buffer[index]
            value |= (byte & 0x7F) << shift
            index += 1
            shift += 7
            # With the continuation bit set, a minimal varint is worth at least 2**shift:
            # refuse as soon as the prefix alone proves the frame is too large.
            floor = value if not byte & 0x80 else max(value, 1 << shift)
            if floor > self._max_frame:
                raise FrameTooLarge(f"frame of {floor}+ bytes exceeds the limit of {self._max_frame}")
            if not byte & 0x80:
                if byte == 0 and index > 1:
                    raise WireError("length prefix is not a minimal varint")
                break
            if index >= _MAX_VARINT_BYTES:
                raise WireError("length prefix is not a valid varint")
        del self._buffer[:index]
        return value


# --- request schema ---------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A generation request: ``prompt`` text, or ``messages`` (a conversation that the
    worker renders with its model's chat template)."""

    prompt: str = ""
    model: str | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False
    id: str | None = None
    keep_alive: bool = False
    #: Ask for the generated token ids in the ``done`` frame (audits score them).
    return_tokens: bool = False
    #: Ask for a receipt in the ``done`` frame, to countersign on the stream (credits.py).
    receipt: bool = False
    messages: tuple[dict[str, str], ...] | None = None
    stop: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults (``prompt`` unless ``messages``)."""
        out: dict[str, Any] = {} if self.messages is not None else {"prompt": self.prompt}
        if self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        if self.stop:
            out["stop"] = list(self.stop)
        for name, default in _DEFAULTS.items():
            value = getattr(self, name)
            if value != default:
                out[name] = value
        return out


_DEFAULTS = {
    "model": None,
    "max_new_tokens": None,
    "min_new_tokens": 0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "seed": None,
    "stream": False,
    "id": None,
    "keep_alive": False,
    "return_tokens": False,
    "receipt": False,
}


def _int(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"'{key}' must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise WireError(f"'{key}' must be between {lo} and {hi}, got {value}")
    return value


def _float(key: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"'{key}' must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise WireError(f"'{key}' must be between {lo} and {hi}, got {value}")
    return value


def _str(key: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise WireError(f"'{key}' must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise WireError(f"'{key}' is longer than {limit} characters", code="too_large")
    return value


def parse_request(message: dict[str, Any]) -> Request:
    """Validate a request map; raises ``WireError`` naming the first problem."""
    unknown = sorted(set(message) - set(_DEFAULTS) - {"prompt", "messages", "stop"})
    if unknown:
        raise WireError(f"unknown request keys: {', '.join(map(str, unknown))}")
    if "prompt" not in message and "messages" not in message:
        raise WireError("'prompt' is required (or 'messages' for a conversation)")
    if "prompt" in message and "messages" in message:
        raise WireError("give 'prompt' or 'messages', not both")
    fields: dict[str, Any] = {}
    if "prompt" in message:
        fields["prompt"] = _str("prompt", message["prompt"], MAX_PROMPT_CHARS)
    else:
        fields["messages"] = _messages(message["messages"])
    if message.get("stop") is not None:
        fields["stop"] = _stop(message["stop"])
    checks = {
        "model": lambda v: _str("model", v, 256),
        "max_new_tokens": lambda v: _int("max_new_tokens", v, 1, MAX_NEW_TOKENS_LIMIT),
        "min_new_tokens": lambda v: _int("min_new_tokens", v, 0, MAX_NEW_TOKENS_LIMIT),
        "temperature": lambda v: _float("temperature", v, 0.0, 100.0),
        "top_p": lambda v: _float("top_p", v, 0.0, 1.0),
        "top_k": lambda v: _int("top_k", v, 0, MAX_TOP_K),
        "seed": lambda v: _int("seed", v, 0, 2**63 - 1),
        "stream": lambda v: _bool("stream", v),
        "id": lambda v: _str("id", v, 128),
        "keep_alive": lambda v: _bool("keep_alive", v),
        "return_tokens": lambda v: _bool("return_tokens", v),
        "receipt": lambda v: _bool("receipt", v),
    }
    for key, check in checks.items():
        value = message.get(key)
        if value is not None:
            fields[key] = check(value)
    if fields.get("top_p") == 0.0:
        raise WireError("'top_p' must be greater than 0")
    return Request(**fields)


#: Roles a conversation may hold (OpenAI's, which chat templates know).
ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})
MAX_MESSAGES = 256
MAX_STOPS = 4
MAX_STOP_CHARS = 256


def check_messages(messages: object) -> None:
    """Raise ``ValueError`` unless ``messages`` is a non-empty list of role/content maps."""
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise ValueError(f"messages must be a list of 1 to {MAX_MESSAGES} messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f"messages[{index}] must be a map with exactly 'role' and 'content'")
        if message["role"] not in ROLES:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}")
        if not isinstance(message["content"], str):
            raise ValueError(f"messages[{index}].content must be a string")


def check_stop(stop: object) -> None:
    """Raise ``ValueError`` unless ``stop`` is a list of up to 4 non-empty strings."""
    if not isinstance(stop, list) or len(stop) > MAX_STOPS:
        raise ValueError(f"stop must be a list of at most {MAX_STOPS} strings")
    for text in stop:
        if not isinstance(text, str) or not 1 <= len(text) <= MAX_STOP_CHARS:
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    try:
        check_messages(value)
    except ValueError as exc:
        raise WireError(str(exc)) from None
    if sum(len(m["content"]) for m in value) > MAX_PROMPT_CHARS:
        raise WireError(f"'messages' hold more than {MAX_PROMPT_CHARS} characters", code="too_large")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    try:
        check_stop(value)
    except ValueError as exc:
        raise WireError(str(exc)) from None
    return tuple(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise WireError(f"'{key}' must be a boolean")
    return value


# --- response frames --------------------------------------------------------------------


def token_frame(text: str) -> dict[str, Any]:
    return {"type": "token", "text": text}


def error_frame(code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    assert code in ERROR_CODES, code
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame["id"] = request_id
    return frame


FINISH_REASONS = frozenset({"stop", "length"})
#: Largest count a worker may report in ``usage`` (tokens) and in ``timing`` (ms, a day).
_MAX_TOKENS_REPORTED = 10_000_000
_MAX_MS_REPORTED = 86_400_000.0


def check_response(frame: dict[str, Any]) -> dict[str, Any]:
    """Validate a worker's response frame; raise ``WireError`` naming the first problem.

    A client must not trust what a peer sends: a frame without a ``type``, a negative
    token count or a timing of NaN would otherwise surface as a crash far from here. The
    frame is returned with ``usage`` and ``timing`` normalised (missing fields filled in).
    """
    kind = frame.get("type")
    if kind == "token":
        _str("text", frame.get("text"), MAX_RESPONSE_FRAME)
        return frame
    if kind == "error":
        code, message = frame.get("code"), frame.get("message", "")
        if not isinstance(code, str) or not isinstance(message, str):
            raise WireError("error frame needs a string 'code' and 'message'")
        frame["code"] = code if code in ERROR_CODES else "internal"  # a code we don't know: a node failure
        frame["message"] = message[:1000]
        return frame
    if kind != "done":
        raise WireError(f"unknown frame type {str(kind)[:32]!r}")
    _str("text", frame.get("text"), MAX_RESPONSE_FRAME)
    for key in ("model", "fingerprint"):
        if frame.get(key) is not None:
            _str(key, frame[key], 256)
    reason = frame.get("finish_reason", "stop")
    if not isinstance(reason, str) or reason not in FINISH_REASONS:
        raise WireError(f"'finish_reason' must be one of {', '.join(sorted(FINISH_REASONS))}")
    if "tokens" in frame:
        tokens = frame["tokens"]
        if not isinstance(tokens, list) or len(tokens) > MAX_NEW_TOKENS_LIMIT + 1:
            raise WireError(f"'tokens' must be a list of at most {MAX_NEW_TOKENS_LIMIT + 1} token ids")
        for token in tokens:
            _int("tokens[]", token, 0, 2**31 - 1)
    usage, timing = frame.get("usage", {}), frame.get("timing", {})
    if not isinstance(usage, dict) or not isinstance(timing, dict):
        raise WireError("'usage' and 'timing' must be maps")
    frame["usage"] = {
        key: _int(f"usage.{key}", usage.get(key, 0), 0, _MAX_TOKENS_REPORTED) for key in ("prompt_tokens", "completion_tokens")
    }
    frame["timing"] = {
        key: _float(f"timing.{key}", timing.get(key, 0.0), 0.0, _MAX_MS_REPORTED)
        for key in ("queue_ms", "first_token_ms", "total_ms")
    }
    return frame


# --- /dllm/score/1.0.0 ------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreRequest:
    """Score given tokens as a continuation of a prompt: how plausible is each one?"""

    request: Request
    tokens: tuple[int, ...]

    def to_wire(self) -> dict[str, Any]:
        return {**self.request.to_wire(), "tokens": list(self.tokens)}


def parse_score_request(message: dict[str, Any]) -> ScoreRequest:
    """A generate request (``prompt`` or ``messages``, ``model``, sampling) plus ``tokens``."""
    tokens = message.get("tokens")
    if not isinstance(tokens, list) or not 1 <= len(tokens) <= MAX_NEW_TOKENS_LIMIT + 1:
        raise WireError(f"'tokens' must be a list of 1 to {MAX_NEW_TOKENS_LIMIT + 1} token ids")
    checked = tuple(_int("tokens[]", t, 0, 2**31 - 1) for t in tokens)
    return ScoreRequest(parse_request({k: v for k, v in message.items() if k != "tokens"}), checked)


def check_scores(frame: dict[str, Any], count: int) -> dict[str, Any]:
    """Validate a ``scores`` frame for ``count`` tokens; raise ``WireError``."""
    if frame.get("type") == "error":
        return check_response(frame)
    if frame.get("type") != "scores":
        raise WireError(f"expected a scores frame, got {str(frame.get('type'))[:32]!r}")
    _int("prompt_tokens", frame.get("prompt_tokens"), 0, _MAX_TOKENS_REPORTED)
    for key in ("logprobs", "gaps", "ranks", "mass_above"):
        values = frame.get(key)
        if not isinstance(values, list) or len(values) != count:
            raise WireError(f"'{key}' must hold one value per token ({count})")
        for value in values:
            if key == "ranks":
                _int(key, value, 0, 2**31 - 1)
            else:
                _float(key, value, -1e9, 1e9)
    return frame


# --- /dllm/forward/1.0.0 ------------------------------------------------------------------

#: A forward request frame carries hidden states: larger than a generate request.
MAX_FORWARD_FRAME = 8 * 2**20
#: New positions in one forward frame.
MAX_FORWARD_POSITIONS = 4096
MAX_SESSION_CHARS = 64
#: Bytes per value of the dtypes hidden states may travel in.
TENSOR_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
_FIRST_KEYS = {"model", "span", "max_length", "wire_dtype", "sample", "generated"}
_SAMPLE_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "seed", "min_new_tokens", "stop"}


@dataclass(frozen=True)
class TensorMap:
    """Hidden states on the wire: row-major little-endian values of ``shape`` in ``dtype``."""

    dtype: str
    shape: tuple[int, int]
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data}


@dataclass(frozen=True)
class Sample:
    """The last span's sampling parameters (``sample``)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ForwardRequest:
    """One request frame of a forward session (see docs/PROTOCOL.md)."""

    session: str
    start: int | None = None
    tokens: tuple[int, ...] | None = None
    hidden: TensorMap | None = None
    tokenize: Request | None = None
    # First frame only:
    model: str | None = None
    span: tuple[int, int] | None = None
    max_length: int | None = None
    wire_dtype: str = "float32"
    sample: Sample | None = None
    generated: tuple[int, ...] = ()


def parse_forward(message: dict[str, Any], first: bool) -> ForwardRequest:
    """Validate a forward request map; raises ``WireError`` naming the first problem."""
    allowed = {"session", "start", "tokens", "hidden", "tokenize"} | (_FIRST_KEYS if first else set())
    unknown = sorted(set(message) - allowed)
    if unknown:
        later = " (allowed in a session's first frame only)" if set(unknown) & _FIRST_KEYS else ""
        raise WireError(f"unknown forward keys: {', '.join(map(str, unknown))}{later}")
    if "session" not in message:
        raise WireError("'session' is required")
    session = _str("session", message["session"], MAX_SESSION_CHARS)
    if not session:
        raise WireError("'session' must not be empty")
    fields: dict[str, Any] = {"session": session}
    inputs = [key for key in ("tokens", "hidden", "tokenize") if message.get(key) is not None]
    if len(inputs) != 1:
        raise WireError("a forward frame holds exactly one of 'tokens', 'hidden' and 'tokenize'")
    if "tokenize" in inputs:
        text = message["tokenize"]
        if not isinstance(text, dict) or set(text) - {"prompt", "messages"} or len(text) != 1:
            raise WireError("'tokenize' must be {'prompt': str} or {'messages': [...]}")
        fields["tokenize"] = parse_request(text)
    else:
        fields["start"] = _int("start", message.get("start"), 0, 2**31) if "start" in message else _missing("start")
        if "tokens" in inputs:
            tokens = message["tokens"]
            if not isinstance(tokens, list) or not 1 <= len(tokens) <= MAX_FORWARD_POSITIONS:
                raise WireError(f"'tokens' must be a list of 1 to {MAX_FORWARD_POSITIONS} token ids")
            fields["tokens"] = tuple(_int("tokens[]", t, 0, 2**31) for t in tokens)
        else:
            fields["hidden"] = parse_tensor("hidden", message["hidden"])
    if first:
        if "model" in message:
            fields["model"] = _str("model", message["model"], 256)
        if "span" in message:
            span = message["span"]
            if not isinstance(span, list) or len(span) != 2:
                raise WireError("'span' must be [start, end]")
            fields["span"] = (_int("span[0]", span[0], 0, 100_000), _int("span[1]", span[1], 1, 100_000))
        if "tokenize" not in inputs:
            if "max_length" not in message:
                raise WireError("'max_length' is required in a session's first frame")
            fields["max_length"] = _int("max_length", message["max_length"], 1, 2**31)
        if "wire_dtype" in message:
            if message["wire_dtype"] not in TENSOR_DTYPES:
                raise WireError(f"'wire_dtype' must be one of {', '.join(TENSOR_DTYPES)}")
            fields["wire_dtype"] = message["wire_dtype"]
        if message.get("sample") is not None:
            fields["sample"] = _sample(message["sample"])
        if message.get("generated") is not None:
            generated = message["generated"]
            if not isinstance(generated, list) or len(generated) > MAX_NEW_TOKENS_LIMIT:
                raise WireError(f"'generated' must be a list of at most {MAX_NEW_TOKENS_LIMIT} token ids")
            fields["generated"] = tuple(_int("generated[]", t, 0, 2**31) for t in generated)
    return ForwardRequest(**fields)


def parse_tensor(key: str, value: Any) -> TensorMap:
    """A tensor map whose byte count matches its dtype and shape ``[T, hidden]``."""
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise WireError(f"'{key}' must be a map of exactly 'dtype', 'shape' and 'data'")
    if value["dtype"] not in TENSOR_DTYPES:
        raise WireError(f"'{key}.dtype' must be one of {', '.join(TENSOR_DTYPES)}")
    shape = value["shape"]
    if not isinstance(shape, list) or len(shape) != 2:
        raise WireError(f"'{key}.shape' must be [positions, hidden]")
    rows = _int(f"{key}.shape[0]", shape[0], 1, MAX_FORWARD_POSITIONS)
    width = _int(f"{key}.shape[1]", shape[1], 1, 65536)
    data = value["data"]
    if not isinstance(data, bytes) or len(data) != rows * width * TENSOR_DTYPES[value["dtype"]]:
        raise WireError(f"'{key}.data' must be {rows} x {width} {value['dtype']} values as bytes")
    return TensorMap(value["dtype"], (rows, width), data)


def _sample(value: Any) -> Sample:
    if not isinstance(value, dict):
        raise WireError("'sample' must be a map")
    unknown = sorted(set(value) - _SAMPLE_KEYS)
    if unknown:
        raise WireError(f"unknown sample keys: {', '.join(map(str, unknown))}")
    if "max_new_tokens" not in value:
        raise WireError("'sample.max_new_tokens' is required")
    fields: dict[str, Any] = {"max_new_tokens": _int("sample.max_new_tokens", value["max_new_tokens"], 1, MAX_NEW_TOKENS_LIMIT)}
    checks = {
        "temperature": lambda v: _float("sample.temperature", v, 0.0, 100.0),
        "top_p": lambda v: _float("sample.top_p", v, 1e-9, 1.0),
        "top_k": lambda v: _int("sample.top_k", v, 0, MAX_TOP_K),
        "seed": lambda v: _int("sample.seed", v, 0, 2**63 - 1),
        "min_new_tokens": lambda v: _int("sample.min_new_tokens", v, 0, MAX_NEW_TOKENS_LIMIT),
        "stop": _stop,
    }
    for key, check in checks.items():
        if value.get(key) is not None:
            fields[key] = check(value[key])
    return Sample(**fields)


def _missing(key: str) -> Any:
    raise WireError(f"'{key}' is required")
