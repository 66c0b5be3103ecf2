"""Output whose every byte says where it is: records of 10 bytes, "000000000:",
"000000010:", ..., each naming its own offset (no newline, which a terminal would turn
into two bytes). A test checks a chunk against the offset a stream claims for it."""

from __future__ import annotations


def numbered_cmd(total: int) -> str:
    """A shell command printing the first `total` bytes (a multiple of 10) of the records."""
    return f"awk 'BEGIN {{ for (i = 0; i < {total // 10}; i++) printf \"%09d:\", i * 10 }}'"


def numbered(start: int, n: int) -> bytes:
    """Bytes start..start+n of the records."""
    first = start // 10
    whole = b"".join(b"%09d:" % (i * 10) for i in range(first, (start + n) // 10 + 1))
    return whole[start - first * 10 :][:n]
