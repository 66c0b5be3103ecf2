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
    found, _ = frames.find_hello(noise + hello + after, "abc")
    assert found is not None
    obj, end = found
    assert obj["nonce"] == "abc"
    assert (noise + hello + after)[end:] == after
    assert frames.find_hello(noise + hello, "other")[0] is None


def test_hello_arriving_in_pieces_is_found_resuming_where_the_last_search_stopped() -> None:
    # A stale frame that claims to be a long chan-0 answer, then the real one.
    bogus = frames.HEADER.pack(40000, 0, Kind.RESP) + b'{"nonce":"abc"'
    stream = bogus + b"\x00" + frames.encode_json(0, Kind.RESP, {"ok": True, "nonce": "abc"})
    buf, pos, found = b"", 0, None
    for i in range(0, len(stream), 7):
        buf += stream[i : i + 7]
        found, pos = frames.find_hello(buf, "abc", pos)
        if found is not None:
            break
    assert found is not None and found[1] == len(stream)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 60000,  # nested past the recursion limit
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":1e999}',  # overflows to inf
        b'{"a":1,"a":2}',  # which one would win is the parser's choice
        '{"a":"b"}'.encode("utf-16"),
        b'{"a":"\xff"}',
    ],
)
def test_what_python_json_would_take_but_json_is_not_is_a_violation(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid JSON"):
        frames.decode_json(payload)


def test_a_hello_search_resumes_past_what_it_has_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    # Empty chan-0 answers every 9 bytes: each used to be decoded, and the whole window
    # rescanned on every read (650 ms a scan, the event loop of every sandbox stalled).
    decoded: list[bytes] = []
    real_decode = frames.decode_json
    monkeypatch.setattr(frames, "decode_json", lambda p: decoded.append(p) or real_decode(p))
    flood = frames.HEADER.pack(0, 0, Kind.RESP) * 7000
    buf, pos = b"", 0
    for _ in range(16):
        buf += flood
        found, pos = frames.find_hello(buf, "abc", pos)
        assert found is None
        assert pos >= len(buf) - frames.HEADER_SIZE  # the next read starts at the new bytes
    assert decoded == []  # none holds the nonce: none is decoded


def test_one_read_of_tiny_frames_is_handed_out_a_batch_at_a_time() -> None:
    # 64 KiB of empty frames is 7,281 of them: parsed all before any was dispatched, they
    # held the event loop (every sandbox of the daemon) ~30 ms.
    count = 65536 // frames.HEADER_SIZE
    dec = FrameDecoder()
    batches = [dec.feed(frames.encode(1, Kind.OUT) * count)]
    assert len(batches[0]) <= 256
    while dec.more:
        batches.append(dec.feed())
    assert max(map(len, batches)) == frames.FEED_FRAMES
    assert sum(map(len, batches)) == count and dec.buffered == 0


def test_a_frame_bigger_than_the_guest_ever_writes_is_a_violation() -> None:
    # The guest writes each frame in one write() of at most 32 KiB: a bigger one only costs
    # the host (a 64 KiB event of `[{},...]` took ~30 ms to decode).
    most = frames.encode(1, Kind.EVENT, b"x" * (32768 - frames.HEADER_SIZE))
    assert len(FrameDecoder().feed(most)) == 1
    with pytest.raises(ProtocolError, match="exceeds the 32759-byte limit"):
        FrameDecoder().feed(frames.encode(1, Kind.EVENT, b"x" * (32768 - frames.HEADER_SIZE + 1)))
