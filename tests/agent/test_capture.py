"""What a capture (isorun.tail.TailBuffer: exec's and the SDK's) keeps of a stream, and what
that costs the host whatever the size of the pieces it arrives in."""

from __future__ import annotations

import sys

from hypothesis import given
from hypothesis import strategies as st

from isorun.tail import TailBuffer


def _held(buf: TailBuffer) -> int:
    return sys.getsizeof(buf.parts) + sum(map(sys.getsizeof, buf.parts))


def test_output_in_tiny_pieces_costs_about_its_size() -> None:
    # 400 KB taken 2 bytes at a time (a process writing a little at a time, its consumer
    # keeping up) was kept as 200,000 bytes objects: 12.8 MiB, 34 times its size.
    buf = TailBuffer(64 << 20)
    for i in range(200_000):
        buf.add(b"%02d" % (i % 100))
    assert buf.size == 400_000
    assert _held(buf) < 1.25 * buf.size, _held(buf)
    assert buf.kept() == b"".join(b"%02d" % (i % 100) for i in range(200_000))


def test_a_capture_that_is_cut_keeps_costing_about_its_limit() -> None:
    buf = TailBuffer(100_000)
    for i in range(300_000):
        buf.add(b"%d" % (i % 10))
    assert (buf.size, buf.dropped) == (100_000, 200_000)
    assert _held(buf) < 1.5 * 100_000, _held(buf)
    assert buf.kept() == b"".join(b"%d" % (i % 10) for i in range(200_000, 300_000))


@given(
    st.lists(st.binary(max_size=3000) | st.integers(60_000, 140_000).map(b"b".__mul__)),
    st.none() | st.integers(0, 200_000),
)
def test_a_capture_keeps_the_newest_bytes_up_to_its_limit(
    pieces: list[bytes], limit: int | None
) -> None:
    buf = TailBuffer(limit)
    for piece in pieces:
        buf.add(piece)
    whole = b"".join(pieces)
    keep = len(whole) if limit is None else min(limit, len(whole))
    assert buf.kept() == whole[len(whole) - keep :]
    assert (buf.size, buf.dropped) == (keep, len(whole) - keep)
