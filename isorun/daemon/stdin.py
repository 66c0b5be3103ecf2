"""Stdin pipes of background processes: one long-lived agent `attach` channel per process
that HTTP writes (POST .../stdin) feed and POST .../stdin/close ends with EOF.

Which processes have an open stdin is kept in the state database, not in memory: after a
daemon restart the guest still holds the process and its pipe, and the first write reopens
the agent channel (`attach` with `stdin: true`).

Memory is bounded: a pipe queues at most QUEUE_CHUNKS chunks of at most MAX_CHUNK bytes (a
writer past that waits, which holds back its HTTP request, for at most STDIN_WAIT_S: then it
gets 409 `stdin_full`, nothing of it sent; one whose bytes were queued but not yet taken by
then gets 409 `stdin_queued`, its bytes still to come), and a sandbox has at most
MAX_PIPES open pipes (the least recently used idle one is closed, without EOF, to make
room; with none idle, a write to another process is 409 `stdin_busy`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterator
from typing import Any, cast

from isorun.agent import AgentClient
from isorun.daemon.errors import Conflict
from isorun.daemon.store import Store

MAX_CHUNK = 1 << 20
QUEUE_CHUNKS = 4
MAX_PIPES = 32
# How long a write waits for room in a full pipe (a process not reading its stdin).
STDIN_WAIT_S = 60.0

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class StdinPipe:
    """Feeds one process's stdin through an attach channel with `stdin: true`."""

    def __init__(self, agent: AgentClient, proc_id: str, spawn: Spawn) -> None:
        self.proc_id = proc_id
        # Each chunk with a future the feeder resolves once the chunk has been sent to the
        # guest, so a 200 for POST .../stdin means the bytes left the daemon (a daemon crash
        # right after it loses nothing the client was told was sent).
        self._q: asyncio.Queue[tuple[bytes | None, asyncio.Future[None]]] = asyncio.Queue(
            maxsize=QUEUE_CHUNKS
        )
        # The chunks the feeder has taken: a process that exits on reading its last input
        # ("exit" to a shell) ends the channel before the feeder asks for more, and that
        # chunk was sent all the same. Not so if the channel was cut (the sandbox ended,
        # the pipe abandoned): the chunk may still have been on its way.
        self._taken: set[asyncio.Future[None]] = set()
        self._process_exited = False  # the channel ended with the process, not cut
        # A close asked for, and (closed) its EOF queued after the bytes before it: from
        # then on nothing more may be written, nor another close sent ahead of that EOF.
        self.closing = False
        self.closed = False
        self.last_byte = 0  # of what was written (a terminal's EOF depends on it)
        self.writers = 0  # requests writing (or closing) now
        self.task = spawn(self._run(agent))

    async def _source(self) -> AsyncIterator[bytes]:
        sent: asyncio.Future[None] | None = None
        while True:
            if sent is not None and not sent.done():
                sent.set_result(None)  # the feeder asks for more: the last chunk went out
            item, sent = await self._q.get()
            self._taken.add(sent)
            if item is None:
                sent.set_result(None)  # EOF follows right after the source ends
                return
            yield item

    async def _run(self, agent: AgentClient) -> None:
        with contextlib.suppress(Exception):
            await agent.attach(self.proc_id, output=False, capture=False, stdin=self._source())
            self._process_exited = True

    @property
    def alive(self) -> bool:
        return not self.task.done()

    async def write(self, data: bytes) -> bool:
        """Queue bytes for the process; False if the pipe ended (the process exited, or the
        sandbox ended) before they were sent."""
        with self._writing():
            for i in range(0, len(data), MAX_CHUNK):
                if not await self._put(data[i : i + MAX_CHUNK]):
                    return False
        if data:
            self.last_byte = data[-1]
        return True

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        self.writers += 1
        try:
            yield
        finally:
            self.writers -= 1

    @property
    def idle(self) -> bool:
        """No request writes to it and nothing waits in it: closing it loses nothing."""
        return self.writers == 0 and self._q.empty()

    def terminal_eof(self) -> bytes:
        """What ends a terminal's input after what was written: ^D, which ends it only at
        the start of a line; after a partial line a first one just hands that line over."""
        return b"\x04" if self.last_byte in (0, 0x0A, 0x0D, 0x04) else b"\x04\x04"

    async def close(self) -> bool:
        """EOF after the bytes already queued: the guest closes the pipe; False as for write.
        A close refused for want of room (stdin_full) leaves the stdin open."""
        self.closing = True
        try:
            with self._writing():
                return await self._put(None)
        finally:
            self.closing = self.closed

    async def _put(self, item: bytes | None) -> bool:
        """Queue `item` and wait until it was handed to the agent channel."""
        if self.task.done():
            return False
        loop = asyncio.get_running_loop()
        # one bound for the whole request (room in the queue, then the bytes taken): clients
        # wait for the 409 as long as that, not twice as long
        deadline = loop.time() + STDIN_WAIT_S
        sent: asyncio.Future[None] = loop.create_future()
        put = asyncio.ensure_future(self._q.put((item, sent)))
        done, _ = await asyncio.wait(
            {put, self.task}, timeout=STDIN_WAIT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if put in done and item is None:
            self.closed = True
        if put not in done:
            put.cancel()
            if not done:
                # A client that gave up would otherwise stay parked here with its body for
                # as long as the process does not read (the server never cancels it).
                raise Conflict(
                    f"process {self.proc_id} has not read its stdin for {STDIN_WAIT_S:g} s "
                    f"({QUEUE_CHUNKS} MiB wait for it already): nothing of this request was "
                    "sent; retry later",
                    code="stdin_full",
                )
            return False
        # (typeshed's asyncio.wait wants one future type; a Future and a Task mix fine)
        waits = cast("set[asyncio.Task[Any]]", {sent, self.task})
        done, _ = await asyncio.wait(
            waits, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
        )
        taken = sent in self._taken
        self._taken.discard(sent)
        if not done:
            raise Conflict(
                f"process {self.proc_id} has not read its stdin for {STDIN_WAIT_S:g} s: this "
                "request's bytes are queued for it and go to it as it reads (do not resend)",
                code="stdin_queued",
            )
        return sent in done or (taken and self._process_exited)

    def abandon(self) -> None:
        """Detach without EOF (the process keeps its stdin open)."""
        self.task.cancel()


class StdinPipes:
    """The open pipes of every sandbox, keyed by (sandbox id, proc id)."""

    def __init__(self, store: Store) -> None:
        self._pipes: dict[str, OrderedDict[str, StdinPipe]] = {}
        # Background processes started with a stdin pipe (not yet closed), persisted; rows
        # of a sandbox go when it ends (Store.end_sandbox).
        self._store = store

    def started_with_stdin(self, sandbox_id: str, proc_id: str) -> None:
        self._store.add_stdin_proc(sandbox_id, proc_id)

    def has_stdin(self, sandbox_id: str, proc_id: str) -> bool:
        return self._store.has_stdin_proc(sandbox_id, proc_id)

    def stdin_closed(self, sandbox_id: str, proc_id: str) -> None:
        self._store.drop_stdin_proc(sandbox_id, proc_id)

    def prune(self, live: Collection[str]) -> None:
        """Forget pipes of sandboxes that have ended (their pipe tasks ended with them)."""
        for sid in [s for s in self._pipes if s not in live]:
            for pipe in self._pipes.pop(sid).values():
                pipe.abandon()

    def get(self, sandbox_id: str, proc_id: str) -> StdinPipe | None:
        """The live pipe of a process, closing or closed ones included: its caller must not
        open a second channel beside one whose EOF is still on its way."""
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
            # the least recently used that is idle: one a request is writing to, or whose
            # queued bytes were promised to the process, is not cut (its writer would be told
            # the process exited, part of its bytes delivered)
            idle = next((pid for pid, p in pipes.items() if p.idle), None)
            if idle is None:
                raise Conflict(
                    f"{MAX_PIPES} processes of this sandbox have stdin writes in progress or "
                    "queued: retry once one of them has been read",
                    code="stdin_busy",
                )
            pipes.pop(idle).abandon()
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
