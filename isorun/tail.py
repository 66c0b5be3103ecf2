"""The newest bytes of a stream, within a bound: what a capture of a process's output keeps
(the agent client's and the SDK's), so that a flood never fills the caller's memory."""

from __future__ import annotations

import collections


class TailBuffer:
    """A stream's newest `limit` bytes (0: none, None: all), and how many it left out. The
    end of an output (the error, the summary) is what a caller reads first."""

    __slots__ = ("dropped", "limit", "parts", "size")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.parts: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.dropped = 0

    def add(self, data: bytes) -> None:
        if self.limit == 0:
            self.dropped += len(data)
            return
        self.parts.append(data)
        self.size += len(data)
        while self.limit is not None and self.size > self.limit:
            first = self.parts[0]
            cut = min(len(first), self.size - self.limit)
            if cut == len(first):
                self.parts.popleft()
            else:
                self.parts[0] = first[cut:]
            self.size -= cut
            self.dropped += cut

    def kept(self) -> bytes:
        return b"".join(self.parts)
