"""`Sandbox`: the synchronous face."""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator
from types import TracebackType
from typing import Any, Literal, overload

import httpx

from isorun.errors import IsorunError
from isorun.sdk import _core, _daemon, _records
from isorun.sdk._answers import ID, shaped
from isorun.sdk._callbacks import call_back
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
)


def _client(s: Settings) -> _core.Client:
    return _core.sync_client(s)


class Sandbox:
    """A microVM sandbox. `with Sandbox("python") as sb: sb.exec("...")`; exit destroys it."""

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
        _info: dict[str, Any] | None = None,
    ) -> None:
        """`on_progress` receives `PullProgress` steps while the daemon pulls or builds the
        image and boots the VM (a first `Sandbox("python")` builds for ~100 s)."""
        self._settings = _daemon.resolve(api_url, api_key, autostart)
        if _info is None:
            _daemon.ensure_daemon(self._settings)
        self._http = _client(self._settings)
        try:
            if _info is None:
                body = _core.create_body(
                    image, vcpus, memory_mib, disk_mib, env, metadata, sandbox_timeout
                )
                _info = self._create(body, on_progress)
        except BaseException:
            self._http.close()
            raise
        self._info: dict[str, Any] = _info
        self.id: str = _info["id"]
        self._usage: Usage | None = None
        self._http.closed_error = self._closed_error
        self.files = Files(self)
        self.processes = Processes(self)

    def __repr__(self) -> str:
        return _core.sandbox_repr(self)

    def _path(self, tail: str = "") -> str:
        return _core.sandbox_path(self.id, tail)

    def _closed_error(self) -> IsorunError:
        """What using this object after `close()` (or its with block) raises."""
        if self._usage is not None:
            return SandboxEndedError(
                f"sandbox {self.id} was destroyed (by destroy() or the end of its with "
                "block): create a new one with Sandbox(image)",
                410,
                "sandbox_ended",
            )
        return SandboxClosedError(
            f"this Sandbox object was closed; sandbox {self.id} may run on: get a new handle "
            f"with Sandbox.connect({self.id!r})"
        )

    def _create(self, body: dict[str, Any], on_progress: ProgressCallback | None) -> dict[str, Any]:
        """Create the sandbox; one the daemon created (and bills) that this cannot hand back
        (a callback raised, ^C, the stream broke off) is destroyed, if its id is known."""
        if on_progress is None:
            resp = self._http.post("/v1/sandboxes", json=body, timeout=_core.CREATE_TIMEOUT)
            return _core.created(_core.check(resp), _core.asked(resp))
        dec = ProgressDecoder(on_progress)
        try:
            with self._http.stream(
                "POST",
                "/v1/sandboxes",
                params={"progress": "1"},
                json=body,
                timeout=self._http.ndjson_timeout(_core.CREATE_TIMEOUT),
            ) as r:
                _core.refused(r)
                for line in _core.ndjson_lines(r):
                    dec.feed(line)
                return _core.created(dec.result("sandbox"), _core.asked(r))
        except BaseException as exc:
            if dec.sandbox_id:
                self._destroy_unreturned(dec.sandbox_id, exc)
            raise

    def _destroy_unreturned(self, sandbox_id: str, exc: BaseException) -> None:
        try:
            _core.check(self._http.delete(_core.sandbox_path(sandbox_id), timeout=30.0))
        except SandboxEndedError:
            pass  # ended already (the daemon ends a sandbox whose boot failed): nothing left
        except Exception as err:
            exc.add_note(f"isorun: sandbox {sandbox_id} was created, but not destroyed: {err}")
        else:
            exc.add_note(f"isorun: sandbox {sandbox_id} was created, and destroyed")

    # --- class-level ---------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        autostart: bool | None = None,
    ) -> Sandbox:
        """Reattach to a running sandbox by id (it outlives any client)."""
        path = _core.sandbox_path(sandbox_id)
        s = _daemon.resolve(api_url, api_key, autostart)
        _daemon.ensure_daemon(s)
        with _client(s) as c:
            info = _core.answer(c.get(path), "a sandbox", id=ID, state=str)
        if info["state"] == "ended":
            raise SandboxEndedError(
                f"sandbox {sandbox_id} has ended ({info.get('end_reason')})", 410, "sandbox_ended"
            )
        return cls(api_url=api_url, api_key=api_key, autostart=autostart, _info=info)

    @classmethod
    def list(
        cls,
        *,
        metadata: dict[str, str] | None = None,
        include_ended: bool = False,
        api_url: str | None = None,
        api_key: str | None = None,
        autostart: bool | None = None,
    ) -> builtins.list[dict[str, Any]]:
        s = _daemon.resolve(api_url, api_key, autostart)
        _daemon.ensure_daemon(s)
        params = {f"metadata.{k}": v for k, v in (metadata or {}).items()}
        if include_ended:
            params["all"] = "1"
        with _client(s) as c:
            resp = c.get("/v1/sandboxes", params=params)
            return [
                shaped(sb, _core.asked(resp), "a sandbox", id=str)
                for sb in _core.answer(resp, sandboxes=list)["sandboxes"]
            ]

    # --- lifecycle -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        self._info = _core.answer(self._http.get(self._path()), "a sandbox")
        return self._info

    def set_timeout(self, seconds: int) -> None:
        self._info = _core.answer(
            self._http.post(self._path("timeout"), json={"sandbox_timeout": seconds}),
            "a sandbox",
        )

    def destroy(self) -> Usage:
        """Kill the sandbox; returns what it cost, measured on the host:
        {"cpu_ms", "mem_peak_bytes", "uptime_ms"}, with "billed_seconds" and "cost_usd" when
        this call ended it (not for a sandbox that had ended already). Safe to call twice."""
        if self._usage is None:
            asked = f"DELETE {self._path()}"
            try:
                r = _core.check(self._http.delete(self._path()))
            except SandboxEndedError:
                asked = f"GET {self._path()}"
                r = self.info().get("usage")
            self._usage = _records.usage_of(r, asked)
        return self._usage.copy()

    kill = destroy

    def logs(self) -> str:
        """The guest console (boot messages; useful when a sandbox fails to start)."""
        resp = self._http.get(self._path("logs"))
        _core.check(resp, want_json=False)  # an error must raise, not come back as its text
        return resp.text

    def close(self) -> None:
        """Close the HTTP client; the sandbox keeps running (see `connect`). This object
        cannot be used after (SandboxClosedError)."""
        self._http.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._http.is_closed and self._usage is None:
            # close()d in the block: its end still destroys the sandbox, as it promised
            self._http = _client(self._settings)
            self._http.closed_error = self._closed_error
        try:
            self.destroy()
        finally:
            self.close()

    # --- exec ------------------------------------------------------------------------

    @overload
    def exec(
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
    def exec(
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
    ) -> Process: ...

    @overload
    def exec(
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
    ) -> ExecResult | Process: ...

    def exec(
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
    ) -> ExecResult | Process:
        """Run `cmd` (a shell string, or an argv list). Callbacks get output as it is written.
        `background=True` returns a `Process` at once instead of an `ExecResult` (callbacks
        and `check` go to its `wait()`, not here); with `stdin=True` (or initial bytes) its
        stdin stays open for `send_stdin`/`close_stdin`. `timeout` is in seconds; None or 0
        means no limit (as in E2B). The result keeps each stream's newest `capture_limit`
        bytes (64 MiB; 0 none, None all) and counts the rest in `stdout_dropped` and
        `stderr_dropped`: callbacks see every byte either way."""
        if background:
            _core.check_background(on_stdout, on_stderr, check, capture_limit)
        body = _core.exec_body(cmd, env, cwd, user, timeout, stdin, background)
        path = self._path("exec")
        if background:
            r = _core.answer(self._http.post(path, **_core.json_body(body)), proc_id=ID, pid=int)
            proc = Process(self, r["proc_id"], r["pid"])
            if isinstance(stdin, str | bytes) and stdin:
                proc.send_stdin(stdin)
            return proc
        dec = _records.StreamDecoder(on_stdout, on_stderr, capture_limit=capture_limit)
        self._run(dec, body)
        result = dec.result()
        if check and result.exit_code != 0:
            raise CommandFailed(result)
        return result

    def pty(
        self,
        rows: int = 24,
        cols: int = 80,
        cmd: str | builtins.list[str] | None = None,
        *,
        env: dict[str, str] | None = None,
        cwd: _core.SandboxPath | None = None,
        user: str | None = None,
        on_data: Callable[[bytes], object] | None = None,
    ) -> Pty:
        """An interactive terminal (default: a login shell). `send()` keystrokes, `resize()`,
        iterate the output bytes or pass `on_data` and `wait()`; `kill()` ends it."""
        body = _core.pty_body(rows, cols, cmd, env, cwd, user)
        r = _core.answer(
            self._http.post(self._path("pty"), **_core.json_body(body)), proc_id=ID, pid=int
        )
        return Pty(self, r["proc_id"], r["pid"], on_data)

    def _run(self, dec: _records.StreamDecoder, body: dict[str, Any]) -> None:
        """A foreground exec of `body`, its output into `dec`. Abandoned by the caller once
        it started (^C, a callback that raised), the command is killed: nothing else knows
        its process id to stop it (an error of the SDK's says how to follow it instead)."""
        try:
            self._stream("POST", self._path("exec"), dec, **_core.json_body(body))
        except BaseException as exc:
            if _core.abandoned(exc, dec):
                path, kw = _core.kill_request(self.id, dec.proc_id)
                try:
                    _core.check(self._http.post(path, **kw))
                except Exception as err:
                    _core.note_kill(exc, self.id, dec.proc_id, err)
                else:
                    _core.note_kill(exc, self.id, dec.proc_id, None)
            raise

    def _stream(self, method: str, path: str, dec: _records.StreamDecoder, **kw: Any) -> None:
        with (
            _core.following(dec),
            self._http.stream(method, path, timeout=self._http.ndjson_timeout(), **kw) as resp,
        ):
            _core.refused(resp)
            for line in _core.ndjson_lines(resp):
                dec.feed(line)
        dec.end()


class Process:
    """A background process: `wait()`, `kill()`, `signal()`, iterate its output."""

    def __init__(self, sb: Sandbox, proc_id: str, pid: int) -> None:
        self.sandbox = sb
        self.id = proc_id
        self.pid = pid

    def __repr__(self) -> str:
        return _core.process_repr(self, self.sandbox.id)

    def _path(self, tail: str) -> str:
        return self.sandbox._path(_core.proc_tail(self.id, tail))

    def send_stdin(self, data: str | bytes) -> None:
        """Write to the process's stdin (started with `stdin=True`, or a PTY)."""
        for chunk in _core.stdin_chunks(data):
            _core.check(
                self.sandbox._http.post(
                    self._path("stdin"), content=chunk, timeout=_core.STDIN_TIMEOUT
                )
            )

    def close_stdin(self) -> None:
        """EOF after what was sent (^D on a PTY)."""
        _core.check(self.sandbox._http.post(self._path("stdin/close"), timeout=_core.STDIN_TIMEOUT))

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size (PTY processes only)."""
        _core.check(
            self.sandbox._http.post(self._path("resize"), json={"rows": rows, "cols": cols})
        )

    def wait(
        self,
        *,
        offset: int = 0,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        capture_limit: int | None = _records.CAPTURE_LIMIT,
    ) -> ExecResult:
        """Replay output from `offset` (bytes of stdout+stderr), follow it, return at exit
        (the result keeps each stream's newest `capture_limit` bytes, as `exec`'s)."""
        dec = _records.StreamDecoder(
            on_stdout, on_stderr, proc_id=self.id, capture_limit=capture_limit
        )
        self.sandbox._stream("GET", self._path("stream"), dec, params={"offset": offset})
        return dec.result()

    def _follow(self, dec: _records.StreamDecoder, offset: int) -> Iterator[tuple[str, bytes]]:
        """The (stream, bytes) chunks of the output from `offset` as `dec` decodes them."""
        http = self.sandbox._http
        with (
            _core.following(dec),
            http.stream(
                "GET",
                self._path("stream"),
                params={"offset": offset},
                timeout=http.ndjson_timeout(),
            ) as resp,
        ):
            _core.refused(resp)
            for line in _core.ndjson_lines(resp):
                if (got := dec.feed(line)) is not None:
                    yield got

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """Yield ("stdout"|"stderr", text) chunks from the start until the process exits."""
        dec = _records.StreamDecoder(capture=False, proc_id=self.id)
        for stream, data in self._follow(dec, 0):
            if text := dec.text(stream, data):
                yield stream, text
        for stream, text in dec.rest():
            yield stream, text
        dec.result()  # a stream that ended before the process did says so

    def kill(self, grace: float = 2.0) -> dict[str, Any]:
        return dict(
            _core.answer(
                self.sandbox._http.post(
                    self._path("kill"), json={"grace": grace}, timeout=_core.kill_timeout(grace)
                )
            )
        )

    def signal(self, signum: int | str) -> None:
        """Send a signal: a number, a `signal.Signals`, or a name ("TERM", "SIGUSR1")."""
        body = {"signal": _core.signal_number(signum)}
        _core.check(self.sandbox._http.post(self._path("signal"), json=body))


class Pty:
    """An interactive terminal in the sandbox (see `Sandbox.pty`)."""

    def __init__(
        self, sb: Sandbox, proc_id: str, pid: int, on_data: Callable[[bytes], object] | None
    ) -> None:
        self.process = Process(sb, proc_id, pid)
        self.id, self.pid, self.on_data = proc_id, pid, on_data
        self.offset = 0  # output bytes already delivered
        self.result: ExecResult | None = None

    def __repr__(self) -> str:
        return _core.process_repr(self, self.process.sandbox.id)

    def send(self, data: str | bytes) -> None:
        self.process.send_stdin(data)

    def resize(self, rows: int, cols: int) -> None:
        self.process.resize(rows, cols)

    def kill(self, grace: float = 2.0) -> dict[str, Any]:
        return self.process.kill(grace)

    def __iter__(self) -> Iterator[bytes]:
        """Output bytes as the terminal writes them, from where the last read stopped, until
        the process exits (then `result` is set)."""
        dec = _records.StreamDecoder(capture=False, proc_id=self.id, offset=self.offset)
        for _, data in self.process._follow(dec, self.offset):
            self.offset = dec.offset
            yield data
        self.offset = dec.offset  # a gap after the last output moves it too
        self.result = dec.result()

    def wait(self) -> ExecResult:
        """Follow the output (to `on_data`) until the process exits; its result (no output
        captured: terminals can run for days)."""
        for chunk in self:
            if self.on_data is not None:  # an async one raises TypeError, not a lost call
                call_back("on_data", self.on_data, chunk, None)
        assert self.result is not None
        return self.result


class Processes:
    def __init__(self, sb: Sandbox) -> None:
        self._sb = sb

    def list(self) -> list[ProcessInfo]:
        resp = self._sb._http.get(self._sb._path("processes"))
        r = _core.answer(resp, processes=list)
        return [ProcessInfo.of(p, _core.asked(resp)) for p in r["processes"]]

    def connect(self, proc_id: str) -> Process:
        _core.url_id("process id", proc_id)  # an impossible id: ValueError, no request
        for p in self.list():
            if p.proc_id == proc_id:
                return Process(self._sb, proc_id, p.pid)
        raise _core.error_for(
            404, {"error": {"code": "not_found", "message": f"process {proc_id!r} not found"}}
        )


class Files:
    def __init__(self, sb: Sandbox) -> None:
        self._sb = sb

    @property
    def _base(self) -> str:
        return self._sb._path("files")

    @overload
    def read(self, path: _core.SandboxPath, *, format: Literal["text"] = ...) -> str: ...
    @overload
    def read(self, path: _core.SandboxPath, *, format: Literal["bytes"]) -> bytes: ...
    @overload
    def read(self, path: _core.SandboxPath, *, format: Literal["stream"]) -> Iterator[bytes]: ...
    @overload
    def read(self, path: _core.SandboxPath, *, format: str) -> str | bytes | Iterator[bytes]: ...

    def read(
        self, path: _core.SandboxPath, *, format: str = "text"
    ) -> str | bytes | Iterator[bytes]:
        """format: "text" (str), "bytes", or "stream" (an iterator of byte chunks)."""
        _core.check_read_format(format)
        if format == "stream":  # untimed, from the start of the answer on
            return self._open_stream(path, _core.STREAM_TIMEOUT)
        # the client's timeout for the answer to start, the file's bytes untimed (as a
        # stream's: a pause is the guest's or the file's)
        data = b"".join(self._open_stream(path, self._sb._http.timeout))
        return data if format == "bytes" else data.decode("utf-8", "replace")

    def _open_stream(self, path: _core.SandboxPath, timeout: httpx.Timeout) -> Iterator[bytes]:
        """The file's chunks: `timeout` is the answer's, its body untimed."""
        http = self._sb._http
        name = _core.file_path(path)
        url = _core.with_query(self._base, {"path": name})
        req = http.build_request("GET", url, timeout=timeout)
        resp = http.send(req, stream=True)
        if resp.status_code >= 300:  # a missing file fails here, not at the first chunk
            try:
                _core.refused(resp)
            finally:
                resp.close()
        _core.untime_body(resp)

        def chunks() -> Generator[bytes, None, None]:
            got = 0
            try:
                for chunk in _core.body_chunks(resp):
                    got += len(chunk)
                    yield chunk
            except DaemonUnavailable as exc:
                raise _core.read_cut(exc, name, got, self._sandbox_now()) from exc
            finally:
                resp.close()

        return _ReadStream(chunks(), resp)

    def _sandbox_now(self) -> httpx.Response | None:
        """The daemon's answer about this sandbox, if it answers at once."""
        try:
            return self._sb._http.get(self._sb._path(), timeout=5.0)
        except IsorunError:
            return None

    def write(
        self,
        path: _core.SandboxPath,
        data: _core.Whole | _core.BytesSource,
        *,
        mode: int | None = None,
        append: bool = False,
    ) -> int:
        """Write str, bytes, a binary file object or an iterable of bytes chunks (streamed);
        a file opened in text mode, or str chunks, raise TypeError."""
        content: bytes | Iterable[bytes]
        if isinstance(data, str | bytes | bytearray | memoryview):
            content = _core.whole_chunks(_core.to_bytes(data))
        else:
            content = _core.write_chunks(data)
        params = {"path": _core.file_path(path)}
        if mode is not None:  # else an existing file keeps its mode, a new one gets 0644
            params["mode"] = _core.mode_param(mode)
        if append:
            params["append"] = "1"
        r = _core.answer(
            self._sb._http.put(
                _core.with_query(self._base, params),
                content=content,
                timeout=_core.STREAM_TIMEOUT,
            ),
            bytes=int,
        )
        return int(r["bytes"])

    def list(self, path: _core.SandboxPath, depth: int = 1) -> builtins.list[FileInfo]:
        resp = self._sb._http.get(
            _core.with_query(self._base + "/list", {"path": _core.file_path(path), "depth": depth})
        )
        r = _core.answer(resp, entries=list)
        return [FileInfo.of(e, _core.asked(resp)) for e in r["entries"]]

    def stat(self, path: _core.SandboxPath) -> FileInfo:
        resp = self._sb._http.get(
            _core.with_query(self._base + "/stat", {"path": _core.file_path(path)})
        )
        return FileInfo.of(_core.check(resp), _core.asked(resp))

    def exists(self, path: _core.SandboxPath) -> bool:
        """False also where a parent of `path` is not a directory (as os.path.exists)."""
        try:
            self.stat(path)
        except NotFoundError:
            return False
        except ApiError as exc:
            if exc.code == "guest_not_dir":
                return False
            raise
        return True

    def mkdir(self, path: _core.SandboxPath, parents: bool = True) -> None:
        _core.check(
            self._sb._http.post(
                self._base + "/mkdir",
                **_core.json_body({"path": _core.file_path(path), "parents": parents}),
            )
        )

    def remove(self, path: _core.SandboxPath, recursive: bool = False) -> None:
        _core.check(
            self._sb._http.post(
                self._base + "/remove",
                **_core.json_body({"path": _core.file_path(path), "recursive": recursive}),
            )
        )

    def rename(self, src: _core.SandboxPath, dst: _core.SandboxPath) -> None:
        _core.check(
            self._sb._http.post(
                self._base + "/rename",
                **_core.json_body({"src": _core.file_path(src), "dst": _core.file_path(dst)}),
            )
        )

    def watch(self, path: _core.SandboxPath, recursive: bool = False) -> Watch:
        """Watch `path` (and below it, with recursive): returns once the sandbox watches it,
        so a change made after this returns is reported; iterate (op, path) pairs, and
        `close()` it (or use a with block) when done. A missing path raises here."""
        http = self._sb._http
        req = http.build_request(
            "GET",
            _core.with_query(
                self._base + "/watch", {"path": _core.file_path(path), "recursive": int(recursive)}
            ),
            timeout=http.ndjson_timeout(),
        )
        resp = http.send(req, stream=True)
        if resp.status_code >= 300:
            try:
                _core.refused(resp)
            finally:
                resp.close()
        return Watch(resp)


class _ReadStream(Iterator[bytes]):
    """The chunks of `files.read(format="stream")`. Its answer is open from the start (a
    missing file raises at once) and closed at the end, by close(), or when the object is
    dropped unread: a generator never started would hold its pooled connection for good."""

    def __init__(self, chunks: Generator[bytes, None, None], resp: httpx.Response) -> None:
        self._chunks, self._resp = chunks, resp

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        try:
            self._chunks.close()
        finally:
            self._resp.close()

    def __enter__(self) -> _ReadStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class Watch:
    """Changes in a sandbox's files (see `Files.watch`): iterate (op, path) pairs; ops are
    create, write, remove, rename, chmod and overflow (changes were missed). Iteration ends
    when the watched path itself goes away, or once the watch is closed (also from another
    thread, which ends a loop blocked on it at once)."""

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self._lines = _core.ndjson_lines(resp)
        self._closed = False

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> tuple[str, str]:
        if self._closed:
            raise StopIteration
        try:
            for line in self._lines:
                change = _core.watch_change(line)
                if change is not None:
                    return change
        except Exception:
            if self._closed:  # what closing it under the read broke: the end asked for
                raise StopIteration from None
            raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        self._closed = True
        _core.wake_reader(self._resp)
        self._resp.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
