"""How the SDK reads NDJSON streams and file bodies at their edges: a line with no end, a
separator JSON strings may hold, a cut before or after the exit record, a caller that
abandons a command, records of the wrong shape, a watch closed under a read, bodies that do
not decode, streams never read. A fake daemon answers; no VM boots."""

from __future__ import annotations

import gc
import math
import re
import threading
import time
from collections.abc import Callable

import fakeapi
import httpx
import pytest
from fakeapi import SID, FakeDaemon, answer, answer_raw, b64, fake_daemon, ndjson

from isorun import ApiError, AsyncSandbox, DaemonUnavailable, Sandbox
from isorun.sdk import _core

MiB = 1 << 20
START = {"type": "start", "proc_id": "p1", "pid": 7}
EXIT = {"type": "exit", "proc_id": "p1", "exit_code": 0, "signal": None, "duration_ms": 5}
PROC = {**fakeapi.PROC, "output_bytes": 12}


def _sb(url: str) -> Sandbox:
    return Sandbox(api_url=url, _info={"id": SID})


async def _asb(url: str) -> AsyncSandbox:
    return await AsyncSandbox.connect(SID, api_url=url)


def _stream(*parts: bytes, cut: bool = False) -> Callable[[FakeDaemon], None]:
    def send(h: FakeDaemon) -> None:
        h.start_chunked()
        for part in parts:
            h.chunk(part)
        h.cut() if cut else h.end_chunked()

    return send


# --- lines ---------------------------------------------------------------------------


def test_an_endless_line_is_refused_after_its_bound() -> None:
    """httpx's iter_lines held the whole line: 96 MiB were read before any error."""
    sent = [0]

    def endless(h: FakeDaemon) -> None:
        h.start_chunked()
        h.chunk(ndjson(START) + b'{"type":"stdout","data":"')
        try:
            while sent[0] < 64 * MiB:
                h.chunk(b"A" * MiB)
                sent[0] += MiB
        except OSError:
            pass

    route = ("POST", r"/exec$", endless)
    with fake_daemon([route]) as fake, pytest.raises(ApiError, match="over 8 MiB") as err:
        _sb(fake.url).exec("x", capture_limit=0)
    assert err.value.code == "stream_malformed"
    assert sent[0] < 16 * MiB, f"{sent[0] >> 20} MiB of one line read"


def test_lines_split_at_newlines_only_and_across_chunks() -> None:
    lines = _core.NdjsonLines("GET /x")
    # U+2028 and \x1c are line breaks to str.splitlines (and so httpx's iter_lines)
    assert lines.feed('{"a":"x\u2028y\x1cz"}\n{"b":'.encode()) == ['{"a":"x\u2028y\x1cz"}'.encode()]
    assert lines.feed(b"1}") == []
    assert lines.feed(b"\n\n{") == [b'{"b":1}', b""]
    assert lines.end() == [b"{"] and lines.end() == []
    with pytest.raises(ApiError, match="over 8 MiB"):
        lines.feed(b"x" * (_core.NDJSON_LINE_MAX + 1) + b"\n")


def test_a_watched_name_with_a_line_separator_is_one_record() -> None:
    # U+2028 and U+0085 are line breaks to str.splitlines, JSON strings may hold them raw
    record = '{"type":"fs","op":"create","path":"/tmp/a\u2028b\x85c"}\n'.encode()
    with fake_daemon([("GET", r"/files/watch", _stream(record))]) as fake:
        w = _sb(fake.url).files.watch("/tmp")
        assert next(w) == ("create", "/tmp/a\u2028b\x85c")


# --- cuts ----------------------------------------------------------------------------


def _replay(h: FakeDaemon) -> None:
    match = re.search(r"offset=(\d+)", h.path)
    offset = int(match.group(1)) if match else 0
    rest = b"hello\nworld\n"[offset:]
    attached = {"type": "attached", "offset": offset}
    _stream(ndjson(attached, {"type": "stdout", "data": b64(rest)}, EXIT))(h)


HELLO = ndjson(START, {"type": "stdout", "data": b64(b"hello\n")})
CUT_ROUTES = [
    ("POST", r"/exec$", _stream(HELLO, cut=True)),
    ("GET", r"/processes$", answer({"processes": [PROC]})),
    ("GET", r"/processes/p1/stream", _replay),
]


def test_a_cut_says_the_offset_to_follow_the_process_on_from() -> None:
    """The advice was connect('p1').wait(), a replay from 0: callbacks got output twice."""
    with fake_daemon(CUT_ROUTES) as fake:
        sb = _sb(fake.url)
        seen: list[str] = []
        with pytest.raises(DaemonUnavailable) as cut:
            sb.exec("echo hello; sleep 1; echo world", on_stdout=seen.append)
        assert (cut.value.proc_id, cut.value.offset) == ("p1", 6)
        assert "sandbox.processes.connect('p1').wait(offset=6)" in str(cut.value)
        sb.processes.connect("p1").wait(offset=cut.value.offset or 0, on_stdout=seen.append)
        assert "".join(seen) == "hello\nworld\n"
        assert not fake.asked("POST", "/kill"), "a cut is not an abandon: the process runs on"


async def test_async_a_cut_says_the_offset_to_follow_the_process_on_from() -> None:
    with fake_daemon(CUT_ROUTES) as fake:
        sb = await _asb(fake.url)
        with pytest.raises(DaemonUnavailable) as cut:
            await sb.exec("echo hello; sleep 1; echo world")
        assert cut.value.offset == 6 and ".wait(offset=6)" in str(cut.value)
        seen: list[str] = []
        await (await sb.processes.connect("p1")).wait(offset=6, on_stdout=seen.append)
        assert seen == ["world\n"]
        await sb.close()


EXIT_THEN_CUT = ndjson(START, {"type": "stdout", "data": b64(b"done\n")}, EXIT)


def test_a_cut_after_the_exit_record_keeps_the_result() -> None:
    with fake_daemon([("POST", r"/exec$", _stream(EXIT_THEN_CUT, cut=True))]) as fake:
        r = _sb(fake.url).exec("echo done")
    assert (r.stdout, r.exit_code) == ("done\n", 0)


async def test_async_a_cut_after_the_exit_record_keeps_the_result() -> None:
    with fake_daemon([("POST", r"/exec$", _stream(EXIT_THEN_CUT, cut=True))]) as fake:
        sb = await _asb(fake.url)
        r = await sb.exec("echo done")
        await sb.close()
    assert (r.stdout, r.exit_code) == ("done\n", 0)


# --- abandoned commands ----------------------------------------------------------------


def _forever(killed: threading.Event) -> list[tuple[str, str, Callable[[FakeDaemon], None]]]:
    def exec_yes(h: FakeDaemon) -> None:
        h.start_chunked()
        h.chunk(ndjson(START, {"type": "stdout", "data": b64(b"y\n")}))
        killed.wait(10)  # `yes` runs on in the guest until killed

    def kill(h: FakeDaemon) -> None:
        killed.set()
        h.json(200, {"exit_code": None, "signal": 15})

    return [("POST", r"/exec$", exec_yes), ("POST", r"/processes/p1/kill$", kill)]


def test_an_abandoned_exec_is_killed() -> None:
    """^C (or a callback that raises) left the command running in the sandbox, unseen. A
    callback's own failed SDK request (an ApiError) is the caller's too."""
    for raised in (KeyboardInterrupt, RuntimeError, ApiError):

        def on_stdout(text: str, raised: type[BaseException] = raised) -> None:
            if raised is ApiError:
                raise ApiError("the callback's own request failed", 404, "not_found")
            raise raised

        killed = threading.Event()
        with fake_daemon(_forever(killed)) as fake:
            with pytest.raises(raised) as err:
                _sb(fake.url).exec("yes", on_stdout=on_stdout)
            assert killed.is_set(), "no kill was sent"
        assert f"isorun: process p1 was killed in sandbox {SID}" in err.value.__notes__


@pytest.mark.parametrize("raised", [RuntimeError("the caller's bug"), ApiError("own", 404, "x")])
async def test_async_an_abandoned_exec_is_killed(raised: Exception) -> None:
    killed = threading.Event()

    async def on_stdout(text: str) -> None:
        raise raised

    with fake_daemon(_forever(killed)) as fake:
        sb = await _asb(fake.url)
        with pytest.raises(type(raised)):
            await sb.exec("yes", on_stdout=on_stdout)
        await sb.close()
    assert killed.is_set()


# --- watches ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b"[1]\n", b'{"type":"fs","path":"/a"}\n', b'{"type":"fs","op":1,"path":"/a"}\n', b"{no\n"],
)
def test_a_watch_record_that_is_none_is_an_api_error(line: bytes) -> None:
    with fake_daemon([("GET", r"/files/watch", _stream(line))]) as fake:
        w = _sb(fake.url).files.watch("/tmp")
        with pytest.raises(ApiError) as err:
            next(w)
    assert err.value.code == "stream_malformed"


async def test_async_a_watch_record_that_is_none_is_an_api_error() -> None:
    with fake_daemon([("GET", r"/files/watch", _stream(b"[1]\n"))]) as fake:
        sb = await _asb(fake.url)
        with pytest.raises(ApiError, match="not an object"):
            async for _ in sb.files.watch("/tmp"):
                pass
        await sb.close()


def test_closing_a_watch_ends_a_loop_blocked_on_it_at_once() -> None:
    """close() from another thread did not stop the loop until the next keepalive (15 s),
    then raised DaemonUnavailable 'Bad file descriptor'."""
    done = threading.Event()

    def silent_after_one(h: FakeDaemon) -> None:
        h.start_chunked()
        h.chunk(b'{"type":"fs","op":"create","path":"/tmp/a"}\n')
        done.wait(20)  # no keepalive: only close() can end the wait

    with fake_daemon([("GET", r"/files/watch", silent_after_one)]) as fake:
        w = _sb(fake.url).files.watch("/tmp")
        assert next(w) == ("create", "/tmp/a")
        out: list[object] = []
        t = threading.Thread(target=lambda: out.append(next(w, "ended")))
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        w.close()
        t.join(5)
        done.set()
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert out == ["ended"] and next(w, "ended") == "ended"


# --- file bodies -----------------------------------------------------------------------


def test_read_streams_dropped_unread_free_their_connections() -> None:
    """Each held a pooled connection for good: after 100, every request waited out the pool
    timeout (60 s) and failed as if the daemon were gone."""
    body = answer_raw(b"x" * 10, "application/octet-stream")
    with fake_daemon([("GET", r"/files\?", body)]) as fake:
        sb = _sb(fake.url)
        sb._http.timeout = httpx.Timeout(5.0)  # of the pool too: 60 s
        for _ in range(110):
            sb.files.read("/f", format="stream")
        gc.collect()
        assert sb.info()["id"] == SID


def _slow_file(h: FakeDaemon) -> None:
    h.start_chunked("application/octet-stream")
    h.chunk(b"first ")
    time.sleep(1.0)
    h.chunk(b"second")
    h.end_chunked()


def test_file_bodies_are_untimed_in_every_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """format="text"/"bytes" had the 60 s request timeout (0.3 s here), "stream" none."""
    monkeypatch.setattr(_core, "DEFAULT_TIMEOUT", 0.3)
    with fake_daemon([("GET", r"/files\?", _slow_file)]) as fake:
        sb = _sb(fake.url)
        assert sb.files.read("/fifo", format="bytes") == b"first second"
        assert sb.files.read("/fifo") == "first second"


async def test_async_file_bodies_are_untimed_in_every_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_core, "DEFAULT_TIMEOUT", 0.3)
    with fake_daemon([("GET", r"/files\?", _slow_file)]) as fake:
        sb = await _asb(fake.url)
        assert await sb.files.read("/fifo", format="bytes") == b"first second"
        await sb.close()


def _garbled(h: FakeDaemon) -> None:
    h.raw(200, b"this is not gzip", "application/json", content_encoding="gzip")


def _garbled_stream(h: FakeDaemon) -> None:
    h.raw(200, b"this is not gzip", "application/octet-stream", content_encoding="gzip")


def test_a_body_that_does_not_decode_is_an_api_error() -> None:
    """httpx.DecodingError is no TransportError: it escaped raw."""
    routes = [("GET", r"/v1/sandboxes/sb-[^/]*$", _garbled), ("GET", r"/files\?", _garbled_stream)]
    with fake_daemon(routes) as fake:
        sb = _sb(fake.url)
        with pytest.raises(ApiError) as err:
            sb.info()
        assert err.value.code == "undecodable" and "DecodingError" in str(err.value)
        with pytest.raises(ApiError) as err:
            b"".join(sb.files.read("/f", format="stream"))
        assert err.value.code == "undecodable"


async def test_async_a_body_that_does_not_decode_is_an_api_error() -> None:
    with fake_daemon([("GET", r"/files\?", _garbled_stream)]) as fake:
        sb = await _asb(fake.url)
        with pytest.raises(ApiError) as err:
            await sb.files.read("/f", format="bytes")
        assert err.value.code == "undecodable"
        await sb.close()


# --- numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.inf, math.nan, -math.inf])
def test_a_timeout_that_is_no_number_of_seconds_is_refused_by_name(value: float) -> None:
    sb = _sb("http://127.0.0.1:9")  # refused before any request
    with pytest.raises(ValueError, match=r"timeout=(inf|nan|-inf): give the seconds"):
        sb.exec("true", timeout=value)


def test_a_huge_keepalive_interval_is_no_limit() -> None:
    """4 * 1e308 is inf: every exec raised OverflowError setting the socket's timeout."""
    routes = [
        ("GET", r"/v1/health", answer({"ok": True, "stream_keepalive_s": 1e308})),
        ("POST", r"/exec$", _stream(ndjson(START, EXIT))),
    ]
    with fake_daemon(routes) as fake:
        assert _sb(fake.url).exec("true").exit_code == 0
