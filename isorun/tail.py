"""The newest bytes of a stream, within a bound: what a capture of a process's output keeps
(the agent client's and the SDK's), so that a flood never fills the caller's memory."""

from __future__ import annotations

import collections

# Small adds are merged into parts of up to this many bytes: a bytes object per add cost
# ~35 bytes besides its own, so output taken 2 bytes at a time held 20-34 times its size.
PART = 1 << 16


class TailBuffer:
    """A stream's newest `limit` bytes (0: none, None: all), and how many it left out. The
    end of an output (the error, the summary) is what a caller reads first."""

    __slots__ = ("dropped", "limit", "parts", "size")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        # a bytearray for small adds merged (grown in place), a big add as it came
        self.parts: collections.deque[bytes | bytearray] = collections.deque()
        self.size = 0
        self.dropped = 0

    def add(self, data: bytes) -> None:
        if self.limit == 0:
            self.dropped += len(data)
            return
        last = self.parts[-1] if self.parts else None
        if isinstance(last, bytearray) and len(last) + len(data) <= PART:
            last += data
        elif len(data) < PART:
            self.parts.append(bytearray(data))
        else:
            self.parts.append(bytes(data))  # the very object, unless a caller passed a view
        self.size += len(data)
        while self.limit is not None and self.size > self.limit:
            first = self.parts[0]
            cut = min(len(first), self.size - self.limit)
            if cut == len(first):
                self.parts.popleft()
            elif isinstance(first, bytearray):
                del first[:cut]
            else:
                self.parts[0] = first[cut:]
            self.size -= cut
            self.dropped += cut

    def kept(self) -> bytes:
        return b"".join(self.parts)
