"""Routes of a sandbox's processes: exec (streamed, or in the background), attach to a
process's output, its stdin, terminal size and signals, and PTY sessions."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from isorun.agent import Attachment, ExecResult, ProcInfo
from isorun.daemon.api import SANDBOX, Api
from isorun.daemon.errors import ApiError, CapacityError, Conflict, NotFound
from isorun.daemon.http import (
    DEFAULT_SHELL,
    STREAM_BACKLOG,
    STREAM_BACKLOG_BYTES,
    Emit,
    Push,
    entry_record,
    error_record,
    only_params,
    parse,
    query_int,
    raw_body,
    stream_error_record,
)
from isorun.daemon.models import (
    ExecRequest,
    KillProcess,
    PtyRequest,
    Resize,
    SignalProcess,
)
from isorun.daemon.sandboxes import Live
from isorun.daemon.stdin import MAX_CHUNK

P = SANDBOX + "/processes/{pid}"
# How long a stream cut by its sandbox's end waits for that end to be recorded (it kills
# the VM and writes the store) before it says so.
END_RECORD_WAIT_S = 10.0
# Output streams (foreground execs' and GET .../stream) one sandbox may have open at once.
MAX_STREAMS_PER_SANDBOX = 64
# Long base64 is decoded this many characters at a time (a multiple of 4; ~2 ms each), other
# requests running in between: 64 MiB in one call held the event loop, every tenant's, for
# ~0.15 s, and a worker thread would hold the GIL as long.
B64_SLICE_CHARS = 1 << 20


async def _b64decode(text: str, slice_chars: int = B64_SLICE_CHARS) -> bytes:
    """base64.b64decode(text, validate=True), in slices."""
    if len(text) <= slice_chars:
        return binascii.a2b_base64(text, strict_mode=True)
    parts = []
    for start in range(0, len(text), slice_chars):
        piece = text[start : start + slice_chars]
        if "=" in piece and start + slice_chars < len(text):
            # a slice decodes on its own: padding must still end the whole text
            raise binascii.Error("Excess data after padding")
        parts.append(binascii.a2b_base64(piece, strict_mode=True))
        await asyncio.sleep(0)
    return b"".join(parts)


class _HeldStdin:
    """The stdin bytes the daemon holds for commands that have not read them yet (a foreground
    exec's, a write waiting for its pipe), bounded all sandboxes together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0

    def take(self, n: int) -> Callable[[], None]:
        """Count n bytes more, or refuse them (503); the release to call once they are gone."""
        if self.bytes + n > self.limit:
            raise CapacityError(
                f"the daemon holds {self.bytes >> 20} MiB of stdin for commands that have not "
                f"read it yet (at most {self.limit >> 20} MiB, ISORUN_HELD_STDIN_MIB): retry "
                "once they have, or upload the input as a file"
            )
        self.bytes += n
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.bytes -= n

        return release


def process_routes(api: Api) -> list[Route]:
    manager, pipes = api.manager, api.pipes
    held_stdin = _HeldStdin(api.cfg.held_stdin_mib << 20)
    streams_open: dict[str, int] = {}  # sandbox id -> its output streams now

    def _stream(
        live: Live,
        run: Callable[[Emit, Push], Awaitable[dict[str, Any]]],
        cancel_on_disconnect: bool,
    ) -> StreamingResponse:
        # Each stream holds up to STREAM_BACKLOG_BYTES for a client slower than its process,
        # and the agent allows 4096 requests per sandbox: bounded per sandbox here.
        sid = live.row.id
        if streams_open.get(sid, 0) >= MAX_STREAMS_PER_SANDBOX:
            raise ApiError(
                f"sandbox {sid} has {MAX_STREAMS_PER_SANDBOX} output streams open (foreground "
                "execs and process streams together); end or close some first",
                status=429,
                code="too_many_streams",
            )
        streams_open[sid] = streams_open.get(sid, 0) + 1
        counted = True

        def uncount() -> None:
            nonlocal counted
            if counted:
                counted = False
                if (n := streams_open[sid] - 1) > 0:
                    streams_open[sid] = n
                else:
                    del streams_open[sid]

        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        detached = False
        queued = 0  # base64 bytes of the output records in q

        def push(rec: dict[str, Any]) -> None:
            if not detached:
                q.put_nowait(rec)

        room = asyncio.Event()

        async def emit(kind: str, data: bytes) -> None:
            nonlocal queued
            while not detached and (q.qsize() >= STREAM_BACKLOG or queued >= STREAM_BACKLOG_BYTES):
                room.clear()
                await room.wait()
            if not detached:
                text = base64.b64encode(data).decode()
                queued += len(text)
                q.put_nowait({"type": kind, "data": text})

        async def runner() -> None:
            try:
                final = await run(emit, push)
                if not detached:
                    q.put_nowait(final)
            except asyncio.CancelledError:
                if not detached and live.ending is not None:
                    # Said once the end is recorded: a client that asks about the sandbox on
                    # this record is told it ended, not that it still runs.
                    await asyncio.wait({live.ending}, timeout=END_RECORD_WAIT_S)
                if not detached:
                    why = f" ({live.end_reason})" if live.end_reason else ""
                    q.put_nowait(
                        stream_error_record(410, "sandbox_ended", f"the sandbox ended{why}")
                    )
                raise
            except Exception as exc:
                q.put_nowait(error_record(await manager.explain(live.row.id, exc)))
            finally:
                q.put_nowait(None)

        task = live.spawn(runner())
        # a response never started (its client gone before the headers) runs no finally
        started = False
        task.add_done_callback(lambda _: None if started else uncount())

        async def body() -> AsyncIterator[bytes]:
            nonlocal detached, queued, started
            started = True
            try:
                while True:
                    item = await q.get()
                    room.set()
                    if item is None:
                        return
                    queued -= len(item.get("data", ""))
                    yield (json.dumps(item, separators=(",", ":")) + "\n").encode()
            finally:
                detached = True
                uncount()
                room.set()
                if cancel_on_disconnect and not task.done():
                    task.cancel()

        return api.ndjson(body())

    def _exit_record(r: ExecResult) -> dict[str, Any]:
        return {
            "type": "exit",
            "proc_id": r.proc_id,
            "exit_code": r.exit_code,
            "signal": r.signal,
            "timed_out": r.timed_out,
            "duration_ms": r.duration_ms,
        }

    async def exec_(request: Request, tenant: str) -> Any:
        only_params(request)  # a `background=1` there ran in the foreground
        req = await parse(request, ExecRequest)
        live = manager.get_live(tenant, request.path_params["sid"])
        pty = (req.pty.rows, req.pty.cols) if req.pty else None
        if req.background:
            proc_id, pid = await _spawn(
                live,
                {"cmd": req.cmd} if req.cmd is not None else {"argv": req.argv},
                env=req.env,
                cwd=req.cwd,
                user=req.user,
                timeout=req.timeout,
                pty=pty,
                tag=req.tag,
                stdin=req.open_stdin,
            )
            return {"proc_id": proc_id, "pid": pid}
        stdin: bytes | None = None
        if req.stdin is not None:
            try:
                stdin = await _b64decode(req.stdin)
            except (binascii.Error, ValueError) as exc:
                raise ApiError(f"stdin must be base64: {exc}", status=422, code="invalid") from exc
        # The command is fed only as fast as it reads: its stdin stays in the daemon until
        # it ends, so the daemon bounds it all.
        release = held_stdin.take(len(stdin or b""))
        req.stdin = None  # decoded above: the base64 would stay with the command as well

        async def run(emit: Emit, push: Push) -> dict[str, Any]:
            def started(proc_id: str, pid: int) -> None:
                push({"type": "start", "proc_id": proc_id, "pid": pid})

            try:
                r = await live.vm.agent.exec(
                    req.cmd,
                    argv=req.argv,
                    env=req.env or None,
                    cwd=req.cwd,
                    user=req.user,
                    timeout=req.timeout,
                    stdin=stdin,
                    pty=pty,
                    on_stdout=lambda b: emit("stdout", b),
                    on_stderr=lambda b: emit("stderr", b),
                    on_start=started,
                    capture=False,
                    tag=req.tag,
                )
            finally:
                release()
            return _exit_record(r)

        # A client that goes away does not stop the command: it runs on, its output stays
        # in the guest's ring, and GET .../processes/{proc_id}/stream replays it.
        try:
            return _stream(live, run, cancel_on_disconnect=False)
        except BaseException:
            release()
            raise

    async def list_procs(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        return {"processes": [entry_record(p) for p in await live.vm.agent.list_procs()]}

    async def connect_proc(request: Request, tenant: str) -> Any:
        only_params(request, "offset")  # a misspelt `ofset=` replayed from 0
        offset = query_int(request, "offset", 0, 0, 1 << 62)
        live = manager.get_live(tenant, request.path_params["sid"])
        proc_id = request.path_params["pid"]
        att = Attachment(offset=offset)
        await _known_proc(live, proc_id)

        async def run(emit: Emit, push: Push) -> dict[str, Any]:
            announced = False
            at = offset  # where the next byte sent starts in the process's output
            told_gap = 0  # of att.gap_bytes, what gap records have said

            def announce() -> None:
                # `attached` first, as soon as the guest says where the replay starts (a
                # silent process, or a resume from the end, has no output to wait for)
                nonlocal announced, at
                if not announced:
                    announced = True
                    at = att.offset
                    push({"type": "attached", "offset": att.offset, "lost": att.lost})

            att.on_attached = announce

            def gap() -> None:
                # The guest skipped the slow reader ahead (att.gap_bytes grew before the
                # output after it): say so where it happened, so a client's offset (which
                # counts what it got) stays the true position and a resume replays nothing.
                nonlocal at, told_gap
                if att.gap_bytes > told_gap:
                    lost, told_gap = att.gap_bytes - told_gap, att.gap_bytes
                    at += lost
                    push({"type": "gap", "lost": lost, "offset": at})

            def out(kind: str) -> Callable[[bytes], Awaitable[None]]:
                async def cb(b: bytes) -> None:
                    nonlocal at
                    announce()  # an agent that sent no `attached` event
                    gap()
                    at += len(b)
                    await emit(kind, b)

                return cb

            r = await live.vm.agent.attach(
                proc_id,
                offset=offset,
                on_stdout=out("stdout"),
                on_stderr=out("stderr"),
                capture=False,
                attachment=att,
            )
            if announced:
                gap()  # one after the last output
            return {
                **_exit_record(r),
                "attached_offset": att.offset,
                "lost": att.lost,
                "gap_bytes": att.gap_bytes,
            }

        return _stream(live, run, cancel_on_disconnect=True)

    async def _known_proc(live: Live, proc_id: str) -> ProcInfo:
        if len(proc_id) <= 64:
            for p in await live.vm.agent.list_procs():
                if p.proc_id == proc_id:
                    return p
        raise NotFound(f"process {proc_id!r} not found in sandbox {live.row.id}")

    async def _spawn(
        live: Live,
        what: dict[str, Any],
        *,
        env: dict[str, str],
        cwd: str | None,
        user: str | None,
        timeout: float | None,
        pty: tuple[int, int] | None,
        tag: str | None,
        stdin: bool,
    ) -> tuple[str, int]:
        """Start a background process (with a stdin pipe when asked: docs/protocol.md exec)."""
        proc_id, pid = await live.vm.agent.spawn(
            what.get("cmd"),
            argv=what.get("argv"),
            env=env or None,
            cwd=cwd,
            user=user,
            timeout=timeout,
            pty=pty,
            tag=tag,
            open_stdin=stdin,
        )
        if stdin:
            pipes.prune(manager.live.keys())
            pipes.started_with_stdin(live.row.id, proc_id)
        return proc_id, pid

    async def _running_proc(live: Live, proc_id: str) -> ProcInfo:
        p = await _known_proc(live, proc_id)
        if not p.running:
            raise Conflict(f"process {proc_id} has exited (exit code {p.exit_code})")
        return p

    async def send_stdin(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        proc_id = request.path_params["pid"]
        data = await raw_body(request, MAX_CHUNK, "stdin (send it in pieces of at most that size)")
        p = await _running_proc(live, proc_id)
        if not p.pty and not pipes.has_stdin(live.row.id, proc_id):
            raise Conflict(
                f"process {proc_id} has no open stdin: start it with 'open_stdin': true"
                " (background exec; the SDK's exec(..., background=True, stdin=True)) or on a"
                " PTY; a closed stdin cannot be reopened"
            )
        pipe = pipes.get(live.row.id, proc_id) or pipes.open(
            live.row.id, proc_id, live.vm.agent, live.spawn
        )
        if pipe.closing:  # its EOF is queued: bytes now would follow it, or be lost
            raise Conflict(f"process {proc_id}: its stdin is closed; it cannot be reopened")
        release = held_stdin.take(len(data))  # a process not reading keeps it here
        try:
            if not await pipe.write(data):
                raise await _stdin_ended(live, proc_id)
        finally:
            release()
        return {"bytes": len(data)}

    async def _stdin_ended(live: Live, proc_id: str) -> ApiError:
        """Why a stdin pipe took no more: its sandbox ended (410 naming why), else its
        process exited."""
        return await manager.end_error(live.row.id) or Conflict(f"process {proc_id} has exited")

    async def close_stdin(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        proc_id = request.path_params["pid"]
        p = await _running_proc(live, proc_id)
        pipe = pipes.get(live.row.id, proc_id)
        if p.pty:
            # On a terminal an end of input is a ^D in it, after what was sent before; the
            # terminal stays open for more (a shell reads on after its `cat` got the ^D).
            if pipe is None:
                await live.vm.agent.close_stdin(proc_id)
            elif not await pipe.write(pipe.terminal_eof()):
                raise await _stdin_ended(live, proc_id)
            return {"ok": True}
        if not pipes.has_stdin(live.row.id, proc_id):
            raise Conflict(
                f"process {proc_id} has no open stdin to close: it was started without "
                "'open_stdin': true (the SDK's stdin=True), or its stdin is closed already"
            )
        if pipe is not None:
            if pipe.closing:  # a second close must not overtake the first one's EOF
                raise Conflict(
                    f"process {proc_id}: its stdin is being closed already (the EOF follows "
                    "the bytes queued before it)"
                )
            try:
                ended = not await pipe.close()  # EOF after the bytes already queued
            except Conflict:
                if pipe.closed:  # stdin_queued: the EOF is queued, the stdin closed
                    pipes.stdin_closed(live.row.id, proc_id)
                raise
            if ended:
                raise await _stdin_ended(live, proc_id)
        else:
            await live.vm.agent.close_stdin(proc_id)
        pipes.stdin_closed(live.row.id, proc_id)
        return {"ok": True}

    async def resize(request: Request, tenant: str) -> Any:
        req = await parse(request, Resize)
        live = manager.get_live(tenant, request.path_params["sid"])
        proc_id = request.path_params["pid"]
        p = await _running_proc(live, proc_id)
        if not p.pty:
            raise Conflict(
                f"process {proc_id} has no terminal to resize: start it with a 'pty'"
                " (POST .../pty or exec with 'pty'; the SDK's sb.pty())"
            )
        await live.vm.agent.resize(proc_id, req.rows, req.cols)
        return {"ok": True}

    async def open_pty(request: Request, tenant: str) -> Any:
        req = await parse(request, PtyRequest)
        live = manager.get_live(tenant, request.path_params["sid"])
        if req.argv is not None:
            what: dict[str, Any] = {"argv": req.argv}
        else:
            what = {"cmd": req.cmd or DEFAULT_SHELL}
        proc_id, pid = await _spawn(
            live,
            what,
            env={"TERM": "xterm-256color", **req.env},
            cwd=req.cwd,
            user=req.user,
            timeout=req.timeout,
            pty=(req.rows, req.cols),
            tag="pty",
            stdin=False,
        )
        return {"proc_id": proc_id, "pid": pid}

    async def kill_proc(request: Request, tenant: str) -> Any:
        req = await parse(request, KillProcess)
        live = manager.get_live(tenant, request.path_params["sid"])
        await _known_proc(live, request.path_params["pid"])
        code, sig = await live.vm.agent.kill(request.path_params["pid"], req.grace)
        return {"exit_code": code, "signal": sig}

    async def signal_proc(request: Request, tenant: str) -> Any:
        req = await parse(request, SignalProcess)
        live = manager.get_live(tenant, request.path_params["sid"])
        await _known_proc(live, request.path_params["pid"])
        await live.vm.agent.signal(request.path_params["pid"], req.signal)
        return {"ok": True}

    return [
        Route(SANDBOX + "/exec", api.endpoint(exec_), methods=["POST"]),
        Route(SANDBOX + "/processes", api.endpoint(list_procs), methods=["GET"]),
        Route(P + "/stream", api.endpoint(connect_proc, streams=True), methods=["GET"]),
        Route(P + "/kill", api.endpoint(kill_proc), methods=["POST"]),
        Route(P + "/signal", api.endpoint(signal_proc), methods=["POST"]),
        Route(P + "/stdin", api.endpoint(send_stdin), methods=["POST"]),
        Route(P + "/stdin/close", api.endpoint(close_stdin), methods=["POST"]),
        Route(P + "/resize", api.endpoint(resize), methods=["POST"]),
        Route(SANDBOX + "/pty", api.endpoint(open_pty, status=201), methods=["POST"]),
    ]
