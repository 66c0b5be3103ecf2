"""Stdin pipes of background processes: one long-lived agent `attach` channel per process
that HTTP writes (POST .../stdin) feed and POST .../stdin/close ends with EOF.

Memory is bounded: a pipe queues at most QUEUE_CHUNKS chunks of at most MAX_CHUNK bytes (a
writer past that waits, which holds back its HTTP request), and a sandbox has at most
MAX_PIPES open pipes (the least recently used one is closed, without EOF, to make room).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from typing import Any

from isorun.agent import AgentClient

MAX_CHUNK = 1 << 20
QUEUE_CHUNKS = 4
MAX_PIPES = 32
MAX_TRACKED = 1024

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class StdinPipe:
    """Feeds one process's stdin through an attach channel with `stdin: true`."""

    def __init__(self, agent: AgentClient, proc_id: str, spawn: Spawn) -> None:
        self.proc_id = proc_id
        self._q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        self.closed = False  # EOF requested
        self.task = spawn(self._run(agent))

    async def _source(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._q.get()
            if item is None:
                return
            yield item

    async def _run(self, agent: AgentClient) -> None:
        with contextlib.suppress(Exception):
            await agent.attach(self.proc_id, output=False, capture=False, stdin=self._source())

    @property
    def alive(self) -> bool:
        return not self.task.done()

    async def write(self, data: bytes) -> bool:
        """Queue bytes for the process; False if the pipe ended (the process exited)."""
        for i in range(0, len(data), MAX_CHUNK):
            if not await self._put(data[i : i + MAX_CHUNK]):
                return False
        return True

    async def close(self) -> None:
        """EOF: the guest closes the pipe (or sends ^D on a PTY)."""
        self.closed = True
        await self._put(None)

    async def _put(self, item: bytes | None) -> bool:
        if self.task.done():
            return False
        put = asyncio.ensure_future(self._q.put(item))
        done, _ = await asyncio.wait({put, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
            return False
        return True

    def abandon(self) -> None:
        """Detach without EOF (the process keeps its stdin open)."""
        self.task.cancel()


class StdinPipes:
    """The open pipes of every sandbox, keyed by (sandbox id, proc id)."""

    def __init__(self) -> None:
        self._pipes: dict[str, OrderedDict[str, StdinPipe]] = {}
        # Background processes this daemon started with a stdin pipe (not yet closed).
        self._open_stdin: dict[str, OrderedDict[str, None]] = {}

    def started_with_stdin(self, sandbox_id: str, proc_id: str) -> None:
        procs = self._open_stdin.setdefault(sandbox_id, OrderedDict())
        procs[proc_id] = None
        while len(procs) > MAX_TRACKED:  # the guest keeps only its 256 latest processes
            procs.popitem(last=False)

    def has_stdin(self, sandbox_id: str, proc_id: str) -> bool:
        return proc_id in self._open_stdin.get(sandbox_id, {})

    def stdin_closed(self, sandbox_id: str, proc_id: str) -> None:
        self._open_stdin.get(sandbox_id, OrderedDict()).pop(proc_id, None)

    def prune(self, live: Collection[str]) -> None:
        """Forget sandboxes that have ended (their pipe tasks ended with them)."""
        for sid in [s for s in self._open_stdin if s not in live]:
            del self._open_stdin[sid]
        for sid in [s for s in self._pipes if s not in live]:
            for pipe in self._pipes.pop(sid).values():
                pipe.abandon()

    def get(self, sandbox_id: str, proc_id: str) -> StdinPipe | None:
        pipes = self._pipes.get(sandbox_id)
        pipe = pipes.get(proc_id) if pipes else None
        if pipe is None or not pipe.alive:
            return None
        assert pipes is not None
        pipes.move_to_end(proc_id)
        return pipe

    def open(self, sandbox_id: str, proc_id: str, agent: AgentClient, spawn: Spawn) -> StdinPipe:
        pipes = self._pipes.setdefault(sandbox_id, OrderedDict())
        for pid in [p for p, pipe in pipes.items() if not pipe.alive]:
            del pipes[pid]
        while len(pipes) >= MAX_PIPES:
            _, oldest = pipes.popitem(last=False)
            oldest.abandon()
        pipe = StdinPipe(agent, proc_id, spawn)
        pipes[proc_id] = pipe

        def forget(_: asyncio.Task[Any]) -> None:
            cur = self._pipes.get(sandbox_id)
            if cur is not None and cur.get(proc_id) is pipe:
                del cur[proc_id]
                if not cur:
                    del self._pipes[sandbox_id]

        pipe.task.add_done_callback(forget)
        return pipe

    def count(self, sandbox_id: str) -> int:
        return sum(1 for p in self._pipes.get(sandbox_id, {}).values() if p.alive)
