"""A sandbox that ends (DELETE, sandbox_timeout) under requests in flight: an upload, an
open watch, stdin writes held back by a process that does not read. Each is told that the
sandbox ended and why (410 `sandbox_ended`), as every later request is; none is told its
process exited, or that bytes nobody read were sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from daemonhelpers import Daemon, ndjson

pytestmark = pytest.mark.vm

MIB = b"y" * (1 << 20)


def _in_thread(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        try:
            results[name] = fn()
        except Exception as exc:  # shown in the assertion that finds it missing
            results[name] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _slow_body() -> Iterator[bytes]:
    for _ in range(40):  # 2.5 MiB over 4 s
        yield b"x" * 65536
        time.sleep(0.1)


def _hold_stdin(
    d: Daemon, path: str, proc_id: str, results: dict[str, Any], writers: int
) -> list[threading.Thread]:
    """`writers` 1 MiB writes and then a close of the stdin of a process that does not read
    it: the first is taken into the agent channel, the next fill the pipe's queue, the rest
    wait for room. The close is sent only once every write's body is out and the daemon
    has answered a request that asks the guest after them: a close that overtook a write
    would have that write refused (409, stdin closed) before the sandbox ends."""
    url = f"{path}/processes/{proc_id}/stdin"
    sent = [threading.Event() for _ in range(writers)]

    def body(done: threading.Event) -> Iterator[bytes]:
        yield MIB
        done.set()  # httpx asks for more only once the MiB is written out

    # made up front: each takes tens of ms of CPU, which would stagger the writes
    clients = [d.client() for _ in range(writers)]
    ts = [
        _in_thread(results, f"stdin{i}", lambda c=c, e=e: c.post(url, content=body(e)))
        for i, (c, e) in enumerate(zip(clients, sent, strict=True))
    ]
    for e in sent:
        assert e.wait(60), "a stdin write's body was never sent"
    with d.client() as c:  # the daemon asks the guest for its processes after the writes did
        assert c.get(f"{path}/processes").status_code == 200
    time.sleep(0.5)  # after the writes: its EOF waits behind them
    ts.append(_in_thread(results, "close", lambda: d.client().post(f"{url}/close")))
    return ts


def _assert_ended(r: Any, why: str) -> None:
    assert isinstance(r, httpx.Response), r
    assert r.status_code == 410, r.text
    err = r.json()["error"]
    assert err["code"] == "sandbox_ended" and f"({why})" in err["message"], err


def _start(c: httpx.Client, image: str) -> tuple[str, str]:
    """A sandbox and, in it, a background process that never reads its open stdin."""
    sid = c.post("/v1/sandboxes", json={"image": image}).json()["id"]
    s = f"/v1/sandboxes/{sid}"
    bg = {"cmd": "sleep 1000", "background": True, "open_stdin": True}
    return s, c.post(f"{s}/exec", json=bg).json()["proc_id"]


def _watch(d: Daemon, s: str, res: dict[str, Any]) -> threading.Thread:
    return _in_thread(res, "watch", lambda: d.client().get(f"{s}/files/watch?path=/tmp"))


def _assert_watch_ended(r: Any, why: str) -> None:
    assert isinstance(r, httpx.Response) and r.status_code == 200, r
    last = ndjson(r)[-1]
    assert last["type"] == "error" and last["status"] == 410, last
    assert last["code"] == "sandbox_ended" and f"({why})" in last["message"], last


def _end(c: httpx.Client, s: str, how: str, ts: list[threading.Thread]) -> None:
    """End the sandbox by DELETE or by its timeout, then wait for the requests in `ts`."""
    if how == "killed":
        assert c.delete(s).status_code == 200
    else:
        assert c.post(f"{s}/timeout", json={"sandbox_timeout": 1}).status_code == 200
    for t in ts:
        t.join(60)


def test_delete_under_upload_and_watch(daemon: Daemon, image: str) -> None:
    res: dict[str, Any] = {}
    with daemon.client() as c:
        s, _ = _start(c, image)
        upload = f"{s}/files?path=/tmp/big"
        ts = [
            _watch(daemon, s, res),
            _in_thread(res, "upload", lambda: daemon.client().put(upload, content=_slow_body())),
        ]
        time.sleep(2)
        assert not res, f"answered before the sandbox ended: {res}"
        _end(c, s, "killed", ts)
    _assert_ended(res["upload"], "killed")
    _assert_watch_ended(res["watch"], "killed")


def test_timeout_under_watch(daemon: Daemon, image: str) -> None:
    res: dict[str, Any] = {}
    with daemon.client() as c:
        s, _ = _start(c, image)
        ts = [_watch(daemon, s, res)]
        time.sleep(2)
        _end(c, s, "timeout", ts)
    _assert_watch_ended(res["watch"], "timeout")


@pytest.mark.parametrize("how", ["killed", "timeout"])
def test_held_stdin_writes_when_the_sandbox_ends(daemon: Daemon, image: str, how: str) -> None:
    res: dict[str, Any] = {}
    with daemon.client() as c:
        s, proc_id = _start(c, image)
        ts = _hold_stdin(daemon, s, proc_id, res, writers=7)
        time.sleep(2)
        assert not res, f"answered before the sandbox ended: {res}"
        _end(c, s, how, ts)
    # none told its process exited, none that 1 MiB nobody read was sent
    for i in range(7):
        _assert_ended(res[f"stdin{i}"], how)
    _assert_ended(res["close"], how)
