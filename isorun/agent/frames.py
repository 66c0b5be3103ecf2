"""Sans-IO codec for the agent wire format (docs/protocol.md, "Frame").

The guest is hostile: the decoder never buffers more than one read and one maximal frame,
hands out a bounded batch of frames per call, and rejects anything outside the contract
instead of guessing.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from isorun.errors import ProtocolError, RequestTooLargeError

HEADER = struct.Struct(">IIB")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 65536
MAX_JSON = MAX_PAYLOAD
# The guest writes each frame whole in one write() of at most 32 KiB (docs/protocol.md
# "Frame", guest/agent/internal/agent/frame.go MaxOutPayload): a bigger one is a violation.
# (A frame's JSON costs the host's event loop its size and more: no more than needed.)
MAX_GUEST_PAYLOAD = 32768 - HEADER_SIZE
# What one FrameDecoder.feed hands out at most: parsing a whole 64 KiB read of empty frames
# (7,281) before any was dispatched held the event loop ~30 ms.
FEED_FRAMES = 256
HELLO_CHAN = 0


class Kind(enum.IntEnum):
    REQ = 1
    RESP = 2
    EVENT = 3
    OUT = 4
    ERR = 5
    IN = 6
    EOF = 7
    CREDIT = 8
    CANCEL = 9


_KINDS = {k.value: k for k in Kind}  # a lookup, not Kind(n): per frame, 6 times as fast
# What each side may legitimately receive; anything else from the guest is a violation.
FROM_GUEST = frozenset({Kind.RESP, Kind.EVENT, Kind.OUT, Kind.ERR, Kind.CREDIT})
DATA_KINDS = frozenset({Kind.OUT, Kind.ERR, Kind.IN})


# not frozen: a frozen dataclass takes 2.5 times as long to make, and the reader makes one
# per frame the guest sends
@dataclass(slots=True)
class Frame:
    chan: int
    kind: Kind
    payload: bytes
    # The payload decoded, once a consumer took the frame (mux.Channel.next): not while it is
    # queued, as decoded JSON can take 20 times its bytes and a queued event is bounded by
    # its bytes (mux.EVENT_BACKLOG).
    body: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def json(self) -> dict[str, Any]:
        """The JSON control payload, an object: decoded once, by whoever took the frame."""
        return self.body if self.body is not None else decode_json(self.payload)

    def credit(self) -> int:
        if len(self.payload) != 4:
            raise ProtocolError(
                f"CREDIT frame on channel {self.chan} has {len(self.payload)} bytes, want 4"
            )
        return int(struct.unpack(">I", self.payload)[0])


def encode(chan: int, kind: Kind, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), chan, kind) + payload


def request_payload(req: dict[str, Any]) -> bytes:
    """A REQ's JSON, refused before anything is sent when it is bigger than one frame."""
    payload = json.dumps(req, separators=(",", ":")).encode()
    if len(payload) > MAX_PAYLOAD:
        op = req.get("op", "?")
        where = (
            " Pass big input as stdin, or write it to a file first, not in the command,"
            " argv or env (a heredoc in the command counts)."
            if op in ("exec", "spawn")
            else ""
        )
        raise RequestTooLargeError(
            f"the '{op}' request is {len(payload)} bytes as JSON, over the {MAX_PAYLOAD}"
            f" one request to the guest agent may be.{where}"
        )
    return payload


def encode_json(chan: int, kind: Kind, obj: dict[str, Any]) -> bytes:
    return encode(chan, kind, json.dumps(obj, separators=(",", ":")).encode())


def encode_credit(chan: int, n: int) -> bytes:
    return encode(chan, Kind.CREDIT, struct.pack(">I", n))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _int_in_double_range(text: str) -> int:
    value = int(text)
    # the largest double has 309 digits: only a longer literal can be out of its range
    if len(text) > 308 and abs(value) > sys.float_info.max:
        raise ValueError(f"number {text[:40]}... is out of range")
    return value


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("an object repeats a key")
    return obj


# Python's json accepts more than JSON: NaN and Infinity, numbers that overflow to inf
# (and integers of any size), a repeated key (the last one silently wins). From the guest
# each is a violation.
_STRICT_JSON = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_float=_finite_float,
    parse_int=_int_in_double_range,
    object_pairs_hook=_object_without_duplicates,
)


def decode_json(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_JSON:
        raise ProtocolError(f"JSON payload of {len(payload)} bytes exceeds {MAX_JSON}")
    try:
        # UTF-8 only (json.loads of bytes would also take UTF-16 and UTF-32)
        obj = _STRICT_JSON.decode(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        what = "nests too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ProtocolError(f"guest sent invalid JSON: {what}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"guest sent JSON {type(obj).__name__}, want an object")
    return obj


def json_cost(payload: bytes) -> int:
    """How much decoding `payload` strictly costs, in the values it may hold (each `{`, `[`,
    `,` and `:`, strings' included): time goes by them, not by bytes (the decoder's checks run
    in Python per object and number: 32 KiB of `[{},{},...]` takes 50 times a string's)."""
    return sum(payload.count(c) for c in (b"{", b"[", b",", b":"))


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole frames, at most FEED_FRAMES per call (call
    again, with no bytes, for the rest: `more` says whether any are). Raises ProtocolError
    on violations."""

    def __init__(
        self, allowed: frozenset[Kind] = FROM_GUEST, max_payload: int = MAX_GUEST_PAYLOAD
    ) -> None:
        self._buf = bytearray()
        self._allowed = allowed
        self._max_payload = max_payload
        self.more = False  # the last feed stopped at FEED_FRAMES: more may be buffered

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes = b"") -> list[Frame]:
        self._buf += data
        buf, pos = self._buf, 0
        frames: list[Frame] = []
        while len(buf) - pos >= HEADER_SIZE:
            if len(frames) == FEED_FRAMES:
                break
            length, chan, kind = HEADER.unpack_from(buf, pos)
            if length > self._max_payload:
                raise ProtocolError(
                    f"frame length {length} exceeds the {self._max_payload}-byte limit"
                )
            if kind not in self._allowed:
                raise ProtocolError(f"frame kind {kind} is not allowed from this peer")
            end = pos + HEADER_SIZE + length
            if len(buf) < end:
                break
            frames.append(Frame(chan, _KINDS[kind], bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        # once per call, not per frame: each cut moves what follows
        del buf[:pos]
        self.more = len(frames) == FEED_FRAMES
        return frames


def find_hello(
    buf: bytes | bytearray, nonce: str, pos: int = 0
) -> tuple[tuple[dict[str, Any], int] | None, int]:
    """The hello RESP carrying `nonce` and the offset just past it (or None), and where to
    resume the search once more bytes arrived (`pos` for the next call).

    After a reconnect the stream may start mid-frame (bytes of an earlier connection);
    scanning for the hello answer is how the host resynchronises. Each byte is looked at
    a bounded number of times, whatever the guest sends: JSON text holds no NUL byte, and
    every header does, so a candidate's payload ends at the first NUL or is decoded once.
    """
    want = HEADER.pack(0, HELLO_CHAN, Kind.RESP)[4:]
    shortest = len(json.dumps({"nonce": nonce}))  # no answer holding the nonce is shorter
    while True:
        i = buf.find(want, max(pos, 4))
        if i < 0:
            return None, max(pos, len(buf) - len(want) + 1)
        (length,) = struct.unpack_from(">I", buf, i - 4)
        start, end = i + len(want), i + len(want) + length
        if shortest <= length <= MAX_JSON and buf.find(b"\x00", start, end) < 0:
            if end > len(buf):
                return None, i  # may be the answer, still arriving (nothing follows it yet)
            obj: dict[str, Any] | None = None
            if buf.find(nonce.encode(), start, end) >= 0:  # cheap, before decoding
                with contextlib.suppress(ProtocolError):
                    obj = decode_json(bytes(buf[start:end]))
            if obj is not None and obj.get("nonce") == nonce:
                return (obj, end), end
        pos = i + 1
