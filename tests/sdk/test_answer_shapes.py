"""Answers of the wrong shape where the daemon's would be (a proxy's, another version's):
the SDK raises its own ApiError `unexpected_answer` naming the field, never a raw KeyError,
TypeError, AttributeError, ValueError or OverflowError; and a sandbox the daemon created but
the SDK cannot hand back is destroyed, not left running and billed. A fake daemon answers;
no VM boots."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fakeapi import PROC, SID, FakeDaemon, answer, answer_raw, fake_daemon, ndjson

from isorun import ApiError, AsyncSandbox, DaemonUnavailable, PullProgress, Sandbox
from isorun.sdk._progress import ProgressDecoder
from isorun.sdk._records import StreamDecoder

FILE = {
    "name": "a",
    "path": "/a",
    "type": "file",
    "size": 1,
    "mode": 0o644,
    "mtime_ns": 0,
    "uid": 0,
    "gid": 0,
}


def _sb(url: str) -> Sandbox:
    return Sandbox(api_url=url, _info={"id": SID})


# (routes, call, what the error names)
SYNC: dict[str, tuple[list[Any], Callable[[str], object], str]] = {
    "create without id": (
        [("POST", r"/v1/sandboxes$", answer({"state": "running"}, 201))],
        lambda url: Sandbox(api_url=url),
        "'id'",
    ),
    "create with a null id": (
        [("POST", r"/v1/sandboxes$", answer({"id": None, "sandbox_id": SID}, 201))],
        lambda url: Sandbox(api_url=url),
        "'id' is None",
    ),
    "connect without state": (
        [("GET", r"/v1/sandboxes/sb-", answer({"id": SID}))],
        lambda url: Sandbox.connect(SID, api_url=url),
        "'state'",
    ),
    "list not an object": (
        [("GET", r"/v1/sandboxes(\?|$)", answer([]))],
        lambda url: Sandbox.list(api_url=url),
        "list, not an object",
    ),
    "info a list": (
        [("GET", r"/v1/sandboxes/sb-", answer([1]))],
        lambda url: _sb(url).info(),
        "not an object",
    ),
    "background exec without proc_id": (
        [("POST", r"/exec$", answer({"pid": 1}))],
        lambda url: _sb(url).exec("x", background=True),
        "'proc_id'",
    ),
    "pty with a pid that is text": (
        [("POST", r"/pty$", answer({"proc_id": "p1", "pid": "7"}))],
        lambda url: _sb(url).pty(),
        "'pid' is '7'",
    ),
    "process list entry short": (
        [("GET", r"/processes$", answer({"processes": [{"proc_id": "p1"}]}))],
        lambda url: _sb(url).processes.list(),
        "ProcessInfo record without its 'pid'",
    ),
    "files.list entry short": (
        [("GET", r"/files/list", answer({"entries": [{"name": "a"}]}))],
        lambda url: _sb(url).files.list("/"),
        "FileInfo record without its 'path'",
    ),
    "files.stat size as text": (
        [("GET", r"/files/stat", answer({**FILE, "size": "1"}))],
        lambda url: _sb(url).files.stat("/a"),
        "'size' is '1'",
    ),
    "files.stat a list": (
        [("GET", r"/files/stat", answer([1]))],
        lambda url: _sb(url).files.stat("/a"),
        "FileInfo record that is list",
    ),
    "files.write without bytes": (
        [("PUT", r"/files\?", answer({}))],
        lambda url: _sb(url).files.write("/a", b"x"),
        "'bytes'",
    ),
    "files.write with bytes True": (
        [("PUT", r"/files\?", answer({"bytes": True}))],
        lambda url: _sb(url).files.write("/a", b"x"),
        "'bytes' is True",
    ),
    "destroy usage not a number": (
        [("DELETE", r"/v1/sandboxes/sb-", answer({"cpu_ms": "n/a"}))],
        lambda url: _sb(url).destroy(),
        "'cpu_ms' is 'n/a'",
    ),
    "destroy usage a list": (
        [("DELETE", r"/v1/sandboxes/sb-", answer({"cpu_ms": [1]}))],
        lambda url: _sb(url).destroy(),
        "'cpu_ms' is [1]",
    ),
    "destroy usage a bool": (
        [("DELETE", r"/v1/sandboxes/sb-", answer({"uptime_ms": True}))],
        lambda url: _sb(url).destroy(),
        "'uptime_ms' is True",
    ),
    "destroy answer a list": (
        [("DELETE", r"/v1/sandboxes/sb-", answer([1]))],
        lambda url: _sb(url).destroy(),
        "usage that is list",
    ),
    "process kill answer a list": (
        [("POST", r"/kill$", answer([1]))],
        lambda url: _sb(url).processes.connect("p1").kill(),
        "list, not an object",
    ),
}


@pytest.mark.parametrize("case", list(SYNC))
def test_a_wrong_shaped_answer_is_an_unexpected_answer(case: str) -> None:
    routes, call, names = SYNC[case]
    routes = [*routes, ("GET", r"/processes$", answer({"processes": [PROC]}))]
    with fake_daemon(routes) as fake, pytest.raises(ApiError) as err:
        call(fake.url)
    assert err.value.code == "unexpected_answer" and names in str(err.value), err.value


def test_nan_and_infinity_are_not_json() -> None:
    """Python's json reads them; int(Infinity) was an OverflowError out of destroy()."""
    for body in (b'{"cpu_ms": Infinity}', b'{"cpu_ms": NaN}', b'{"cpu_ms": -Infinity}'):
        route = ("DELETE", r"/v1/sandboxes/sb-", answer_raw(body))
        with fake_daemon([route]) as fake, pytest.raises(ApiError) as err:
            _sb(fake.url).destroy()
        assert err.value.code == "not_json" and "is not a JSON value" in str(err.value)


def test_the_usage_a_destroy_keeps_is_what_was_answered() -> None:
    bill = {"cpu_ms": 5, "mem_peak_bytes": 6, "uptime_ms": None, "cost_usd": 0.5}
    with fake_daemon([("DELETE", r"/v1/sandboxes/sb-", answer(bill))]) as fake:
        assert _sb(fake.url).destroy() == {**bill, "uptime_ms": 0}


ASYNC: dict[str, tuple[list[Any], Callable[[str], Awaitable[object]], str]] = {
    "create without id": (
        [("POST", r"/v1/sandboxes$", answer({"state": "running"}, 201))],
        lambda url: AsyncSandbox.create(api_url=url),
        "'id'",
    ),
    "connect without state": (
        [("GET", r"/v1/sandboxes/sb-", answer({"id": SID}))],
        lambda url: AsyncSandbox.connect(SID, api_url=url),
        "'state'",
    ),
    "list entries not objects": (
        [("GET", r"/v1/sandboxes(\?|$)", answer({"sandboxes": [1]}))],
        lambda url: AsyncSandbox.list(api_url=url),
        "sandbox that is int",
    ),
}


async def _connected(url: str) -> AsyncSandbox:
    return await AsyncSandbox.connect(SID, api_url=url)


async def _async_destroy(url: str) -> object:
    return await (await _connected(url)).destroy()


async def _async_stat(url: str) -> object:
    return await (await _connected(url)).files.stat("/a")


ASYNC["destroy usage not a number"] = (
    [("DELETE", r"/v1/sandboxes/sb-", answer({"cpu_ms": "n/a"}))],
    _async_destroy,
    "'cpu_ms' is 'n/a'",
)
ASYNC["files.stat short"] = (
    [("GET", r"/files/stat", answer({"name": "a"}))],
    _async_stat,
    "without its 'path'",
)


@pytest.mark.parametrize("case", list(ASYNC))
async def test_async_a_wrong_shaped_answer_is_an_unexpected_answer(case: str) -> None:
    routes, call, names = ASYNC[case]
    with fake_daemon(routes) as fake, pytest.raises(ApiError) as err:
        await call(fake.url)
    assert err.value.code == "unexpected_answer" and names in str(err.value), err.value


def _create_then(after_booting: bytes) -> Callable[[FakeDaemon], None]:
    """A create with progress that says which sandbox it boots, then `after_booting`."""

    def create(h: FakeDaemon) -> None:
        h.start_chunked()
        h.chunk(ndjson({"type": "progress", "phase": "booting", "ref": "base", "sandbox": SID}))
        h.chunk(after_booting)
        h.end_chunked()

    return create


BOOTED_WITHOUT_ID = ndjson({"type": "sandbox", "sandbox": {"state": "running"}})
BOOTED = ndjson({"type": "sandbox", "sandbox": {"id": SID, "state": "running"}})


def _leak_routes(after_booting: bytes) -> list[Any]:
    return [
        ("POST", r"/v1/sandboxes\?progress=1", _create_then(after_booting)),
        ("DELETE", r"/v1/sandboxes/sb-", answer({"cpu_ms": 1})),
    ]


def _raise_at_booting(p: PullProgress) -> None:
    if p.phase == "booting":
        raise KeyboardInterrupt  # the user's ^C while the VM boots


def test_a_sandbox_created_but_not_handed_back_is_destroyed() -> None:
    with fake_daemon(_leak_routes(BOOTED_WITHOUT_ID)) as fake:
        with pytest.raises(ApiError, match="'id'") as err:
            Sandbox(api_url=fake.url, on_progress=lambda p: None)
        assert fake.asked("DELETE", SID)
        assert f"isorun: sandbox {SID} was created, and destroyed" in err.value.__notes__
    with fake_daemon(_leak_routes(BOOTED)) as fake:
        with pytest.raises(KeyboardInterrupt):
            Sandbox(api_url=fake.url, on_progress=_raise_at_booting)
        assert fake.asked("DELETE", SID)


async def test_async_a_sandbox_created_but_not_handed_back_is_destroyed() -> None:
    with fake_daemon(_leak_routes(BOOTED_WITHOUT_ID)) as fake:
        with pytest.raises(ApiError, match="'id'"):
            async with AsyncSandbox(api_url=fake.url, on_progress=lambda p: None):
                pass
        assert fake.asked("DELETE", SID)
    with fake_daemon(_leak_routes(BOOTED)) as fake:
        sb = AsyncSandbox(api_url=fake.url, on_progress=_raise_at_booting)
        with pytest.raises(KeyboardInterrupt):
            await sb._start()
        assert fake.asked("DELETE", SID) and sb._http.is_closed


BOOT_FAILED = ndjson({"type": "error", "status": 500, "code": "boot_failed", "message": "no boot"})


def _ended_already(h: FakeDaemon) -> None:
    msg = f"sandbox {SID} has already ended (error)"
    h.json(410, {"error": {"code": "sandbox_ended", "message": msg}})


@pytest.mark.parametrize("face", ["sync", "async"])
async def test_a_boot_the_daemon_failed_is_not_said_to_be_left_running(face: str) -> None:
    """The daemon ends a sandbox whose boot failed itself: the DELETE after is 410, and the
    note said 'was created, but not destroyed', a billed sandbox maybe left running."""
    routes = [
        ("POST", r"/v1/sandboxes\?progress=1", _create_then(BOOT_FAILED)),
        ("DELETE", r"/v1/sandboxes/sb-", _ended_already),
    ]
    with fake_daemon(routes) as fake, pytest.raises(ApiError, match="no boot") as err:
        if face == "sync":
            Sandbox(api_url=fake.url, on_progress=lambda p: None)
        else:
            async with AsyncSandbox(api_url=fake.url, on_progress=lambda p: None):
                pass
    notes = getattr(err.value, "__notes__", [])
    assert not any("not destroyed" in n for n in notes), notes


def test_an_exit_record_whose_timed_out_is_not_a_bool_is_refused() -> None:
    """The string "false" is truthy: it was read as a timeout."""
    dec = StreamDecoder()
    exit = {"type": "exit", "exit_code": 0, "signal": None, "timed_out": "false"}
    dec.feed(json.dumps(exit))
    with pytest.raises(ApiError, match="timed_out is 'false'"):
        dec.result()
    dec = StreamDecoder()
    dec.feed(json.dumps({**exit, "timed_out": None}))
    assert dec.result().timed_out is False


def test_a_byte_count_that_is_a_bool_is_none() -> None:
    got: list[PullProgress] = []
    dec = ProgressDecoder(got.append)
    dec.feed(json.dumps({"type": "progress", "phase": "pulling", "ref": "r", "bytes_done": True}))
    assert got[0].bytes_done is None


def test_a_sandbox_closed_in_its_with_block_is_still_destroyed() -> None:
    """close() made the block's end raise SandboxClosedError and left the sandbox running."""
    routes = [
        ("POST", r"/v1/sandboxes$", answer({"id": SID, "state": "running"}, 201)),
        ("DELETE", r"/v1/sandboxes/sb-", answer({"cpu_ms": 1})),
    ]
    with fake_daemon(routes) as fake:
        with Sandbox(api_url=fake.url) as sb:
            sb.close()
        assert fake.asked("DELETE", SID)


async def test_async_a_sandbox_closed_in_its_with_block_is_still_destroyed() -> None:
    routes = [
        ("POST", r"/v1/sandboxes$", answer({"id": SID, "state": "running"}, 201)),
        ("DELETE", r"/v1/sandboxes/sb-", answer({"cpu_ms": 1})),
    ]
    with fake_daemon(routes) as fake:
        async with AsyncSandbox(api_url=fake.url) as sb:
            await sb.close()
        assert fake.asked("DELETE", SID)


async def test_async_a_start_that_finds_no_daemon_closes_its_client(tmp_path: Any) -> None:
    """ensure_daemon ran outside the try that closes the client of a failed start."""
    sb = AsyncSandbox(api_url=f"unix:{tmp_path}/none.sock", autostart=False)
    with pytest.raises(DaemonUnavailable, match="no isorun daemon answers"):
        await sb._start()
    assert sb._http.is_closed
