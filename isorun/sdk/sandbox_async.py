"""`AsyncSandbox`: the asyncio face (same core and surface as `Sandbox`)."""

from __future__ import annotations

import builtins
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
)
from types import TracebackType
from typing import Any, Literal, overload

import anyio
import httpx

from isorun.errors import IsorunError
from isorun.sdk import _core, _daemon, _records
from isorun.sdk._answers import ID, shaped
from isorun.sdk._callbacks import call_back, run_pending
from isorun.sdk._daemon import Settings
from isorun.sdk._progress import ProgressCallback, ProgressDecoder
from isorun.sdk._records import ExecResult, FileInfo, OutputCallback, ProcessInfo, Usage
from isorun.sdk.errors import (
    ApiError,
    CommandFailed,
    DaemonUnavailable,
    NotFoundError,
    SandboxClosedError,
    SandboxEndedError,
    SandboxNotStartedError,
)

# How long leaving an `async with` may take to end the sandbox once the caller is cancelled.
CLEANUP_GRACE_S = 30.0


def _client(s: Settings) -> _core.AsyncClient:
    return _core.async_client(s)


class AsyncSandbox:
    """`async with AsyncSandbox("python") as sb:` or `sb = await AsyncSandbox.create(...)`."""

    def __init__(
        self,
        image: str = "base",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        disk_mib: int | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
        sandbox_timeout: int | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
        autostart: bool | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self._settings = _daemon.resolve(api_url, api_key, autostart)
        self._on_progress = on_progress
        self._body = _core.create_body(
            image, vcpus, memory_mib, disk_mib, env, metadata, sandbox_timeout
        )
        self._http = _client(self._settings)
        self._http.closed_error = self._closed_error
        self._info: dict[str, Any] = {}
        self.id = ""
        self._usage: Usage | None = None
        self.files = AsyncFiles(self)
        self.processes = AsyncProcesses(self)

    def __repr__(self) -> str:
        return _core.sandbox_repr(self)

    def _path(self, tail: str = "") -> str:
        if not self.id:
            raise SandboxNotStartedError(
                "this AsyncSandbox was not started: use `await AsyncSandbox.create(...)` or "
                "`async with AsyncSandbox(...) as sb`"
            )
        return _core.sandbox_path(self.id, tail)

    def _closed_error(self) -> IsorunError:
        """What using this object after `close()` (or its async with block) raises."""
        if self._usage is not None:
            return SandboxEndedError(
                f"sandbox {self.id} was destroyed (by destroy() or the end of its async with "
                "block): create a new one with AsyncSandbox.create(image)",
                410,
                "sandbox_ended",
            )
        if not self.id:
            return SandboxClosedError(
                "this AsyncSandbox was closed before it started: make a new one with "
                "`await AsyncSandbox.create(...)`"
            )
        return SandboxClosedError(
            f"this AsyncSandbox object was closed; sandbox {self.id} may run on: get a new "
            f"handle with `await AsyncSandbox.connect({self.id!r})`"
        )

    async def _start(self, info: dict[str, Any] | None = None) -> AsyncSandbox:
        if info is None:
            try:  # the client is this object's: closed on every way out of a failed start
                await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
                info = await self._create(self._on_progress)
            except BaseException:
                await self._http.aclose()
                raise
        self._info, self.id = info, info["id"]
        return self

    async def _create(self, on_progress: ProgressCallback | None) -> dict[str, Any]:
        """As Sandbox._create: a sandbox created but not handed back is destroyed."""
        if on_progress is None:
            resp = await self._http.post(
                "/v1/sandboxes", json=self._body, timeout=_core.CREATE_TIMEOUT
            )
            return _core.created(_core.check(resp), _core.asked(resp))
        dec = ProgressDecoder(on_progress, pending=[])
        try:
            async with self._http.stream(
                "POST",
                "/v1/sandboxes",
                params={"progress": "1"},
                json=self._body,
                timeout=await self._http.ndjson_timeout(_core.CREATE_TIMEOUT),
            ) as r:
                await _core.arefused(r)
                async for line in _core.andjson_lines(r):
                    dec.feed(line)
                    await run_pending(dec.pending)
                return _core.created(dec.result("sandbox"), _core.asked(r))
        except BaseException as exc:
            if dec.sandbox_id:
                with anyio.CancelScope(shield=True) as cleanup:  # as __aexit__
                    cleanup.deadline = anyio.current_time() + CLEANUP_GRACE_S
                    await self._destroy_unreturned(dec.sandbox_id, exc)
            raise

    async def _destroy_unreturned(self, sandbox_id: str, exc: BaseException) -> None:
        try:
            path = _core.sandbox_path(sandbox_id)
            _core.check(await self._http.delete(path, timeout=CLEANUP_GRACE_S))
        except SandboxEndedError:
            pass  # ended already (the daemon ends a sandbox whose boot failed): nothing left
        except Exception as err:
            exc.add_note(f"isorun: sandbox {sandbox_id} was created, but not destroyed: {err}")
        else:
            exc.add_note(f"isorun: sandbox {sandbox_id} was created, and destroyed")

    @classmethod
    async def create(cls, image: str = "base", **kw: Any) -> AsyncSandbox:
        return await cls(image, **kw)._start()

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        autostart: bool | None = None,
    ) -> AsyncSandbox:
        path = _core.sandbox_path(sandbox_id)
        sb = cls(api_url=api_url, api_key=api_key, autostart=autostart)
        try:
            await anyio.to_thread.run_sync(_daemon.ensure_daemon, sb._settings)
            info = _core.answer(await sb._http.get(path), "a sandbox", id=ID, state=str)
        except BaseException:
            await sb._http.aclose()  # its client: nothing else will close it
            raise
        if info["state"] == "ended":
            await sb._http.aclose()
            raise SandboxEndedError(
                f"sandbox {sandbox_id} has ended ({info.get('end_reason')})", 410, "sandbox_ended"
            )
        return await sb._start(info)

    @classmethod
    async def list(
        cls,
        *,
        metadata: dict[str, str] | None = None,
        include_ended: bool = False,
        api_url: str | None = None,
        api_key: str | None = None,
        autostart: bool | None = None,
    ) -> builtins.list[dict[str, Any]]:
        s = _daemon.resolve(api_url, api_key, autostart)
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, s)
        params = {f"metadata.{k}": v for k, v in (metadata or {}).items()}
        if include_ended:
            params["all"] = "1"
        async with _client(s) as c:
            resp = await c.get("/v1/sandboxes", params=params)
            return [
                shaped(sb, _core.asked(resp), "a sandbox", id=str)
                for sb in _core.answer(resp, sandboxes=builtins.list)["sandboxes"]
            ]

    async def info(self) -> dict[str, Any]:
        self._info = _core.answer(await self._http.get(self._path()), "a sandbox")
        return self._info

    async def set_timeout(self, seconds: int) -> None:
        self._info = _core.answer(
            await self._http.post(self._path("timeout"), json={"sandbox_timeout": seconds}),
            "a sandbox",
        )

    async def destroy(self) -> Usage:
        """As `Sandbox.destroy`."""
        if self._usage is None:
            asked = f"DELETE {self._path()}"
            try:
                r = _core.check(await self._http.delete(self._path()))
            except SandboxEndedError:
                asked = f"GET {self._path()}"
                r = (await self.info()).get("usage")
            self._usage = _records.usage_of(r, asked)
        return self._usage.copy()

    kill = destroy

    async def logs(self) -> str:
        resp = await self._http.get(self._path("logs"))
        _core.check(resp, want_json=False)  # an error must raise, not come back as its text
        return resp.text

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        if not self.id:
            await self._start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Shielded: an anyio deadline or cancel scope that ended the block cancels every
        # await in it (level-triggered), and the sandbox would run on, billed, until its
        # timeout. Bounded, so a cancelled caller is not held for long.
        with anyio.CancelScope(shield=True) as cleanup:
            cleanup.deadline = anyio.current_time() + CLEANUP_GRACE_S
            if self._http.is_closed and self._usage is None and self.id:
                # close()d in the block: its end still destroys the sandbox, as it promised
                self._http = _client(self._settings)
                self._http.closed_error = self._closed_error
            try:
                await self.destroy()
            finally:
                await self.close()

    @overload
    async def exec(
        self,
        cmd: str | builtins.list[str],
        *,
        env: dict[str, str] | None = ...,
        cwd: _core.SandboxPath | None = ...,
        user: str | None = ...,
        timeout: float | None = ...,
        stdin: str | bytes | None = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        background: Literal[False] = ...,
        check: bool = ...,
        capture_limit: int | None = ...,
    ) -> ExecResult: ...

    @overload
    async def exec(
        self,
        cmd: str | builtins.list[str],
        *,
        env: dict[str, str] | None = ...,
        cwd: _core.SandboxPath | None = ...,
        user: str | None = ...,
        timeout: float | None = ...,
        stdin: str | bytes | bool | None = ...,
        on_stdout: None = ...,
        on_stderr: None = ...,
        background: Literal[True],
        check: Literal[False] = ...,
    ) -> AsyncProcess: ...

    @overload
    async def exec(
        self,
        cmd: str | builtins.list[str],
        *,
        env: dict[str, str] | None = ...,
        cwd: _core.SandboxPath | None = ...,
        user: str | None = ...,
        timeout: float | None = ...,
        stdin: str | bytes | bool | None = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        background: bool,
        check: bool = ...,
        capture_limit: int | None = ...,
    ) -> ExecResult | AsyncProcess: ...

    async def exec(
        self,
        cmd: str | builtins.list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: _core.SandboxPath | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | bool | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        background: bool = False,
        check: bool = False,
        capture_limit: int | None = _records.CAPTURE_LIMIT,
    ) -> ExecResult | AsyncProcess:
        """As `Sandbox.exec`: a shell string or argv; `timeout` in seconds, None or 0 for
        no limit; `background=True` returns an `AsyncProcess` at once (callbacks and `check`
        go to its `wait()`, not here); the result keeps each stream's newest `capture_limit`
        bytes (64 MiB; 0 none, None all), counting the rest in `stdout_dropped`."""
        if background:
            _core.check_background(on_stdout, on_stderr, check, capture_limit)
        body = _core.exec_body(cmd, env, cwd, user, timeout, stdin, background)
        path = self._path("exec")
        if background:
            r = _core.answer(
                await self._http.post(path, **_core.json_body(body)), proc_id=ID, pid=int
            )
            proc = AsyncProcess(self, r["proc_id"], r["pid"])
            if isinstance(stdin, str | bytes) and stdin:
                await proc.send_stdin(stdin)
            return proc
        dec = _records.StreamDecoder(on_stdout, on_stderr, capture_limit=capture_limit, pending=[])
        await self._run(dec, body)
        result = dec.result()
        if check and result.exit_code != 0:
            raise CommandFailed(result)
        return result

    async def pty(
        self,
        rows: int = 24,
        cols: int = 80,
        cmd: str | builtins.list[str] | None = None,
        *,
        env: dict[str, str] | None = None,
        cwd: _core.SandboxPath | None = None,
        user: str | None = None,
        on_data: Callable[[bytes], object] | None = None,
    ) -> AsyncPty:
        """An interactive terminal (default: a login shell); see `Sandbox.pty`."""
        body = _core.pty_body(rows, cols, cmd, env, cwd, user)
        r = _core.answer(
            await self._http.post(self._path("pty"), **_core.json_body(body)), proc_id=ID, pid=int
        )
        return AsyncPty(self, r["proc_id"], r["pid"], on_data)

    async def _run(self, dec: _records.StreamDecoder, body: dict[str, Any]) -> None:
        """As Sandbox._run: a foreground command abandoned (a cancel, a callback that
        raised) is killed."""
        try:
            await self._stream("POST", self._path("exec"), dec, **_core.json_body(body))
        except BaseException as exc:
            if _core.abandoned(exc, dec):
                path, kw = _core.kill_request(self.id, dec.proc_id)
                with anyio.CancelScope(shield=True):  # a cancelled caller too; kw bounds it
                    try:
                        _core.check(await self._http.post(path, **kw))
                    except Exception as err:
                        _core.note_kill(exc, self.id, dec.proc_id, err)
                    else:
                        _core.note_kill(exc, self.id, dec.proc_id, None)
            raise

    async def _stream(self, method: str, path: str, dec: _records.StreamDecoder, **kw: Any) -> None:
        with _core.following(dec):
            async with self._http.stream(
                method, path, timeout=await self._http.ndjson_timeout(), **kw
            ) as resp:
                await _core.arefused(resp)
                async for line in _core.andjson_lines(resp):
                    dec.feed(line)
                    await run_pending(dec.pending)
        dec.end()
        await run_pending(dec.pending)


class AsyncProcess:
    def __init__(self, sb: AsyncSandbox, proc_id: str, pid: int) -> None:
        self.sandbox, self.id, self.pid = sb, proc_id, pid

    def __repr__(self) -> str:
        return _core.process_repr(self, self.sandbox.id)

    def _path(self, tail: str) -> str:
        return self.sandbox._path(_core.proc_tail(self.id, tail))

    async def send_stdin(self, data: str | bytes) -> None:
        """Write to the process's stdin (started with `stdin=True`, or a PTY)."""
        for chunk in _core.stdin_chunks(data):
            _core.check(
                await self.sandbox._http.post(
                    self._path("stdin"), content=chunk, timeout=_core.STDIN_TIMEOUT
                )
            )

    async def close_stdin(self) -> None:
        """EOF after what was sent (^D on a PTY)."""
        _core.check(
            await self.sandbox._http.post(self._path("stdin/close"), timeout=_core.STDIN_TIMEOUT)
        )

    async def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size (PTY processes only)."""
        _core.check(
            await self.sandbox._http.post(self._path("resize"), json={"rows": rows, "cols": cols})
        )

    async def wait(
        self,
        *,
        offset: int = 0,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        capture_limit: int | None = _records.CAPTURE_LIMIT,
    ) -> ExecResult:
        dec = _records.StreamDecoder(
            on_stdout, on_stderr, proc_id=self.id, capture_limit=capture_limit, pending=[]
        )
        await self.sandbox._stream("GET", self._path("stream"), dec, params={"offset": offset})
        return dec.result()

    async def _follow(
        self, dec: _records.StreamDecoder, offset: int
    ) -> AsyncIterator[tuple[str, bytes]]:
        """The (stream, bytes) chunks of the output from `offset` as `dec` decodes them."""
        http = self.sandbox._http
        with _core.following(dec):
            async with http.stream(
                "GET",
                self._path("stream"),
                params={"offset": offset},
                timeout=await http.ndjson_timeout(),
            ) as resp:
                await _core.arefused(resp)
                async for line in _core.andjson_lines(resp):
                    if (got := dec.feed(line)) is not None:
                        yield got

    async def __aiter__(self) -> AsyncIterator[tuple[str, str]]:
        dec = _records.StreamDecoder(capture=False, proc_id=self.id)
        async for stream, data in self._follow(dec, 0):
            if text := dec.text(stream, data):
                yield stream, text
        for stream, text in dec.rest():
            yield stream, text
        dec.result()  # a stream that ended before the process did says so

    async def kill(self, grace: float = 2.0) -> dict[str, Any]:
        return dict(
            _core.answer(
                await self.sandbox._http.post(
                    self._path("kill"), json={"grace": grace}, timeout=_core.kill_timeout(grace)
                )
            )
        )

    async def signal(self, signum: int | str) -> None:
        """Send a signal: a number, a `signal.Signals`, or a name ("TERM", "SIGUSR1")."""
        body = {"signal": _core.signal_number(signum)}
        _core.check(await self.sandbox._http.post(self._path("signal"), json=body))


class AsyncPty:
    """An interactive terminal in the sandbox (see `AsyncSandbox.pty`). `on_data` may
    return an awaitable: it is awaited before more output is read."""

    def __init__(
        self,
        sb: AsyncSandbox,
        proc_id: str,
        pid: int,
        on_data: Callable[[bytes], object] | None,
    ) -> None:
        self.process = AsyncProcess(sb, proc_id, pid)
        self.id, self.pid, self.on_data = proc_id, pid, on_data
        self.offset = 0
        self.result: ExecResult | None = None

    def __repr__(self) -> str:
        return _core.process_repr(self, self.process.sandbox.id)

    async def send(self, data: str | bytes) -> None:
        await self.process.send_stdin(data)

    async def resize(self, rows: int, cols: int) -> None:
        await self.process.resize(rows, cols)

    async def kill(self, grace: float = 2.0) -> dict[str, Any]:
        return await self.process.kill(grace)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        dec = _records.StreamDecoder(capture=False, proc_id=self.id, offset=self.offset)
        async for _, data in self.process._follow(dec, self.offset):
            self.offset = dec.offset
            yield data
        self.offset = dec.offset  # a gap after the last output moves it too
        self.result = dec.result()

    async def wait(self) -> ExecResult:
        pending: list[Awaitable[object]] = []
        async for chunk in self:
            if self.on_data is not None:
                call_back("on_data", self.on_data, chunk, pending)
                await run_pending(pending)
        assert self.result is not None
        return self.result


class AsyncProcesses:
    def __init__(self, sb: AsyncSandbox) -> None:
        self._sb = sb

    async def list(self) -> list[ProcessInfo]:
        resp = await self._sb._http.get(self._sb._path("processes"))
        r = _core.answer(resp, processes=list)
        return [ProcessInfo.of(p, _core.asked(resp)) for p in r["processes"]]

    async def connect(self, proc_id: str) -> AsyncProcess:
        _core.url_id("process id", proc_id)  # an impossible id: ValueError, no request
        for p in await self.list():
            if p.proc_id == proc_id:
                return AsyncProcess(self._sb, proc_id, p.pid)
        raise NotFoundError(f"process {proc_id!r} not found", 404, "not_found")


async def _in_thread(fn: Callable[[], bytes | None]) -> bytes | None:
    """A blocking read of a file object or sync iterable, off the event loop."""
    return await anyio.to_thread.run_sync(fn)


class AsyncFiles:
    def __init__(self, sb: AsyncSandbox) -> None:
        self._sb = sb

    @property
    def _base(self) -> str:
        return self._sb._path("files")

    @overload
    async def read(self, path: _core.SandboxPath, *, format: Literal["text"] = ...) -> str: ...
    @overload
    async def read(self, path: _core.SandboxPath, *, format: Literal["bytes"]) -> bytes: ...
    @overload
    async def read(
        self, path: _core.SandboxPath, *, format: Literal["stream"]
    ) -> AsyncIterator[bytes]: ...
    @overload
    async def read(
        self, path: _core.SandboxPath, *, format: str
    ) -> str | bytes | AsyncIterator[bytes]: ...

    async def read(
        self, path: _core.SandboxPath, *, format: str = "text"
    ) -> str | bytes | AsyncIterator[bytes]:
        """format: "text" (str), "bytes", or "stream" (an async iterator of byte chunks, so a
        large file is never held whole in memory)."""
        _core.check_read_format(format)
        if format == "stream":  # untimed, from the start of the answer on
            return await self._open_stream(path, _core.STREAM_TIMEOUT)
        # the client's timeout for the answer to start, the file's bytes untimed (as a
        # stream's: a pause is the guest's or the file's)
        data = b"".join([c async for c in await self._open_stream(path, self._sb._http.timeout)])
        return data if format == "bytes" else data.decode("utf-8", "replace")

    async def _open_stream(
        self, path: _core.SandboxPath, timeout: httpx.Timeout
    ) -> AsyncIterator[bytes]:
        """The file's chunks: `timeout` is the answer's, its body untimed."""
        http = self._sb._http
        name = _core.file_path(path)
        url = _core.with_query(self._base, {"path": name})
        req = http.build_request("GET", url, timeout=timeout)
        resp = await http.send(req, stream=True)
        if resp.status_code >= 300:  # a missing file fails here, not at the first chunk
            try:
                await _core.arefused(resp)
            finally:
                await resp.aclose()
        _core.untime_body(resp)

        async def chunks() -> AsyncIterator[bytes]:
            got = 0
            try:
                async for chunk in _core.abody_chunks(resp):
                    got += len(chunk)
                    yield chunk
            except DaemonUnavailable as exc:
                raise _core.read_cut(exc, name, got, await self._sandbox_now()) from exc
            finally:
                await resp.aclose()

        return chunks()

    async def _sandbox_now(self) -> httpx.Response | None:
        """The daemon's answer about this sandbox, if it answers at once."""
        try:
            return await self._sb._http.get(self._sb._path(), timeout=5.0)
        except IsorunError:
            return None

    async def write(
        self,
        path: _core.SandboxPath,
        data: _core.Whole | _core.BytesSource | AsyncIterable[bytes],
        *,
        mode: int | None = None,
        append: bool = False,
    ) -> int:
        """Write str, bytes, a binary file object, or a (sync or async) iterable of bytes
        chunks; everything but str/bytes is streamed. Text (a file opened in text mode, str
        chunks) raises TypeError."""
        content: bytes | AsyncIterator[bytes]
        if isinstance(data, str | bytes | bytearray | memoryview):
            content = _core.to_bytes(data)
        else:
            content = await _core.awrite_chunks(data, _in_thread)
        params = {"path": _core.file_path(path)}
        if mode is not None:  # else an existing file keeps its mode, a new one gets 0644
            params["mode"] = _core.mode_param(mode)
        if append:
            params["append"] = "1"
        r = _core.answer(
            await self._sb._http.put(
                _core.with_query(self._base, params),
                content=content,
                timeout=_core.STREAM_TIMEOUT,
            ),
            bytes=int,
        )
        return int(r["bytes"])

    async def list(self, path: _core.SandboxPath, depth: int = 1) -> builtins.list[FileInfo]:
        resp = await self._sb._http.get(
            _core.with_query(self._base + "/list", {"path": _core.file_path(path), "depth": depth})
        )
        r = _core.answer(resp, entries=builtins.list)
        return [FileInfo.of(e, _core.asked(resp)) for e in r["entries"]]

    async def stat(self, path: _core.SandboxPath) -> FileInfo:
        resp = await self._sb._http.get(
            _core.with_query(self._base + "/stat", {"path": _core.file_path(path)})
        )
        return FileInfo.of(_core.check(resp), _core.asked(resp))

    async def exists(self, path: _core.SandboxPath) -> bool:
        """As `Files.exists`."""
        try:
            await self.stat(path)
        except NotFoundError:
            return False
        except ApiError as exc:
            if exc.code == "guest_not_dir":
                return False
            raise
        return True

    async def mkdir(self, path: _core.SandboxPath, parents: bool = True) -> None:
        _core.check(
            await self._sb._http.post(
                self._base + "/mkdir",
                **_core.json_body({"path": _core.file_path(path), "parents": parents}),
            )
        )

    async def remove(self, path: _core.SandboxPath, recursive: bool = False) -> None:
        _core.check(
            await self._sb._http.post(
                self._base + "/remove",
                **_core.json_body({"path": _core.file_path(path), "recursive": recursive}),
            )
        )

    async def rename(self, src: _core.SandboxPath, dst: _core.SandboxPath) -> None:
        _core.check(
            await self._sb._http.post(
                self._base + "/rename",
                **_core.json_body({"src": _core.file_path(src), "dst": _core.file_path(dst)}),
            )
        )

    def watch(self, path: _core.SandboxPath, recursive: bool = False) -> AsyncWatch:
        """As `Files.watch`: `w = await sb.files.watch(path)` returns once the sandbox
        watches it; `async for op, p in sb.files.watch(path)` starts it at the first step."""
        return AsyncWatch(self._sb, path, recursive)


class AsyncWatch:
    """The asyncio twin of `Watch`; awaiting it starts it (or the first `async for` step)."""

    def __init__(self, sb: AsyncSandbox, path: _core.SandboxPath, recursive: bool) -> None:
        self._sb = sb
        self._params: dict[str, str | int] = {
            "path": _core.file_path(path),
            "recursive": int(recursive),
        }
        self._resp: httpx.Response | None = None
        self._lines: AsyncIterator[bytes] | None = None
        self._closed = False

    async def start(self) -> AsyncWatch:
        if self._resp is None:
            http = self._sb._http
            req = http.build_request(
                "GET",
                _core.with_query(self._sb._path("files/watch"), self._params),
                timeout=await http.ndjson_timeout(),
            )
            resp = await http.send(req, stream=True)
            if resp.status_code >= 300:
                try:
                    await _core.arefused(resp)
                finally:
                    await resp.aclose()
            self._resp, self._lines = resp, _core.andjson_lines(resp)
        return self

    def __await__(self) -> Generator[Any, None, AsyncWatch]:
        return self.start().__await__()

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> tuple[str, str]:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        assert self._lines is not None
        try:
            async for line in self._lines:
                change = _core.watch_change(line)
                if change is not None:
                    return change
        except Exception:
            if self._closed:  # what closing it under the read broke: the end asked for
                raise StopAsyncIteration from None
            raise
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._closed = True
        if self._resp is not None:
            await self._resp.aclose()

    async def __aenter__(self) -> AsyncWatch:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True) as cleanup:  # as AsyncSandbox.__aexit__
            cleanup.deadline = anyio.current_time() + CLEANUP_GRACE_S
            await self.aclose()
