"""The frame codec alone: round trips, limits, and fuzzing with hostile bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isorun.agent import frames
from isorun.agent.frames import FrameDecoder, Kind
from isorun.errors import ProtocolError

guest_kinds = st.sampled_from(sorted(frames.FROM_GUEST))
frame_st = st.tuples(st.integers(0, 2**32 - 1), guest_kinds, st.binary(max_size=2048))


@given(st.lists(frame_st, max_size=20), st.lists(st.integers(1, 4096), min_size=1))
def test_round_trip_survives_any_chunking(
    items: list[tuple[int, Kind, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(frames.encode(c, k, p) for c, k, p in items)
    dec = FrameDecoder()
    got = []
    pos = 0
    i = 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        got += dec.feed(stream[pos : pos + n])
        pos += n
        i += 1
    assert [(f.chan, f.kind, f.payload) for f in got] == items
    assert dec.buffered == 0


@settings(max_examples=500)
@given(st.binary(max_size=4096))
def test_garbage_only_ever_raises_protocol_error(data: bytes) -> None:
    dec = FrameDecoder()
    try:
        for f in dec.feed(data):
            if f.kind in (Kind.RESP, Kind.EVENT):
                f.json()
            if f.kind is Kind.CREDIT:
                f.credit()
    except ProtocolError:
        pass
    # Never holds more than one maximal frame's worth of bytes.
    assert dec.buffered <= frames.HEADER_SIZE + frames.MAX_PAYLOAD


def test_four_gib_length_prefix_is_rejected_before_buffering() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.feed(struct.pack(">IIB", 0xFFFFFFFF, 1, Kind.OUT))


def test_host_only_kinds_from_guest_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="not allowed"):
        FrameDecoder().feed(frames.encode(1, Kind.REQ, b"{}"))


def test_json_must_be_an_object() -> None:
    with pytest.raises(ProtocolError, match="want an object"):
        frames.decode_json(b"[1,2]")
    with pytest.raises(ProtocolError, match="invalid JSON"):
        frames.decode_json(b"\xff{")


def test_hello_found_after_leftover_bytes() -> None:
    noise = b"\x00\x00\x10\x00garbage" + frames.encode(7, Kind.OUT, b"old")[:5]
    hello = frames.encode_json(0, Kind.RESP, {"ok": True, "nonce": "abc"})
    after = frames.encode(3, Kind.OUT, b"x")
    found = frames.find_hello(noise + hello + after, "abc")
    assert found is not None
    obj, end = found
    assert obj["nonce"] == "abc"
    assert (noise + hello + after)[end:] == after
    assert frames.find_hello(noise + hello, "other") is None
