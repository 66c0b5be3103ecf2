"""stdin of background processes and PTY sessions over HTTP, against a real daemon and guest
(one shared sandbox)."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time

import httpx
import pytest
from daemonhelpers import Daemon, ndjson

pytestmark = pytest.mark.vm


def _spawn(c: httpx.Client, sandbox: str, **body: object) -> str:
    r = c.post(f"/v1/sandboxes/{sandbox}/exec", json={"background": True, **body})
    assert r.status_code == 200, r.text
    return str(r.json()["proc_id"])


def _output(c: httpx.Client, sandbox: str, proc_id: str) -> tuple[bytes, dict[str, object]]:
    events = ndjson(c.get(f"/v1/sandboxes/{sandbox}/processes/{proc_id}/stream"))
    data = b"".join(base64.b64decode(str(e["data"])) for e in events if e["type"] == "stdout")
    return data, events[-1]


def _wait_for(c: httpx.Client, sandbox: str, proc_id: str, needle: bytes) -> bytes:
    """Follow a running process's output until `needle` shows up (the stream ends at exit)."""
    seen = b""
    path = f"/v1/sandboxes/{sandbox}/processes/{proc_id}/stream"
    with c.stream("GET", path, timeout=30) as r:
        for line in r.iter_lines():
            ev = json.loads(line)
            if ev["type"] == "stdout":
                seen += base64.b64decode(ev["data"])
                if needle in seen:
                    return seen
    raise AssertionError(f"{needle!r} not in output {seen!r}")


def test_send_stdin_and_close_to_a_background_process(daemon: Daemon, sandbox: str) -> None:
    with daemon.client() as c:
        proc = _spawn(c, sandbox, cmd="cat; echo done", open_stdin=True)
        base = f"/v1/sandboxes/{sandbox}/processes/{proc}"
        r = c.post(base + "/stdin", content=b"hello\n")
        assert r.status_code == 200 and r.json() == {"bytes": 6}, r.text
        assert c.post(base + "/stdin", content=b"\x00binary\xff\n").status_code == 200
        assert c.post(base + "/stdin/close").status_code == 200
        out, last = _output(c, sandbox, proc)
        assert out == b"hello\n\x00binary\xff\ndone\n"
        assert last["type"] == "exit" and last["exit_code"] == 0
        # The process has exited: a clear 409, not a silent drop.
        r = c.post(base + "/stdin", content=b"late\n")
        assert r.status_code == 409 and "exited" in r.json()["error"]["message"]


def test_a_write_or_close_after_a_pending_close_is_refused_and_nothing_is_reordered(
    daemon: Daemon, sandbox: str
) -> None:
    # The process reads only after 6 s: the first write waits for it, the close's EOF is
    # queued behind it. A write then went to a second channel beside the first (200, its
    # bytes spliced into the first's or lost) and a second close overtook the queued bytes.
    with daemon.client() as c:
        proc = _spawn(c, sandbox, cmd="sleep 6; cat > /tmp/pending-close", open_stdin=True)
        base = f"/v1/sandboxes/{sandbox}/processes/{proc}"
        first = b"a" * (1 << 20)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            wrote = pool.submit(lambda: c.post(base + "/stdin", content=first, timeout=60))
            time.sleep(1)
            closed = pool.submit(lambda: c.post(base + "/stdin/close", timeout=60))
            time.sleep(1)
            late = c.post(base + "/stdin", content=b"Z" * 10)
            again = c.post(base + "/stdin/close")
            assert wrote.result().status_code == 200, wrote.result().text
            assert closed.result().status_code == 200, closed.result().text
        assert late.status_code == 409 and "closed" in late.json()["error"]["message"], late.text
        assert again.status_code == 409, again.text
        _output(c, sandbox, proc)  # until it exits
        got = c.get(f"/v1/sandboxes/{sandbox}/files", params={"path": "/tmp/pending-close"})
        assert got.content == first


def test_stdin_bad_input(daemon: Daemon, sandbox: str) -> None:
    with daemon.client() as c:
        s = f"/v1/sandboxes/{sandbox}"
        # Unknown process / sandbox: 404 on every new route.
        for tail in ("stdin", "stdin/close", "resize"):
            body = {"rows": 10, "cols": 10} if tail == "resize" else None
            r = c.post(f"{s}/processes/p999999/{tail}", json=body)
            assert r.status_code == 404, (tail, r.text)
            r = c.post(f"/v1/sandboxes/sb-nope/processes/p1/{tail}", json=body)
            assert r.status_code == 404
        assert c.post("/v1/sandboxes/sb-nope/pty", json={}).status_code == 404
        # No stdin pipe: 409 naming the fix.
        proc = _spawn(c, sandbox, cmd="sleep 30")
        r = c.post(f"{s}/processes/{proc}/stdin", content=b"x")
        assert r.status_code == 409 and "open_stdin" in r.json()["error"]["message"]
        # Resize of a process without a terminal: 409.
        r = c.post(f"{s}/processes/{proc}/resize", json={"rows": 10, "cols": 40})
        assert r.status_code == 409 and "no terminal" in r.json()["error"]["message"]
        assert c.post(f"{s}/processes/{proc}/kill", json={"grace": 0}).status_code == 200
        # open_stdin is for background processes only; stdin (base64) for foreground ones.
        r = c.post(f"{s}/exec", json={"cmd": "cat", "open_stdin": True})
        assert r.status_code == 422 and "open_stdin" in r.json()["error"]["message"]
        r = c.post(f"{s}/exec", json={"cmd": "cat", "background": True, "stdin": "eA=="})
        assert r.status_code == 422 and "open_stdin" in r.json()["error"]["message"]
        # A closed stdin stays closed, and closing it again is a 409 at once (as is closing
        # one never opened), not a wait on a pipe nobody reads.
        proc = _spawn(c, sandbox, cmd="sleep 30", open_stdin=True)
        assert c.post(f"{s}/processes/{proc}/stdin", content=b"x").status_code == 200
        assert c.post(f"{s}/processes/{proc}/stdin/close").status_code == 200
        assert c.post(f"{s}/processes/{proc}/stdin", content=b"x").status_code == 409
        for p in (proc, _spawn(c, sandbox, cmd="sleep 30")):
            r = c.post(f"{s}/processes/{p}/stdin/close", timeout=10)
            assert r.status_code == 409 and "no open stdin" in r.json()["error"]["message"]
            c.post(f"{s}/processes/{p}/kill", json={"grace": 0})
        # Bodies over 1 MiB: 413 (the daemon never buffers more per request).
        proc2 = _spawn(c, sandbox, cmd="cat >/dev/null", open_stdin=True)
        r = c.post(f"{s}/processes/{proc2}/stdin", content=b"x" * ((1 << 20) + 1))
        assert r.status_code == 413 and "1048576" in r.json()["error"]["message"]
        for p in (proc, proc2):
            c.post(f"{s}/processes/{p}/kill", json={"grace": 0})


@pytest.mark.parametrize(
    "body",
    [
        {"rows": 0, "cols": 80},
        {"rows": 24, "cols": 5000},
        {"rows": -1, "cols": 80},
        {"rows": "24", "cols": 80},
        {"rows": 24},
        {"rows": 24, "cols": 80, "depth": 1},
    ],
)
def test_bad_resize_values_are_422(daemon: Daemon, sandbox: str, body: dict[str, object]) -> None:
    with daemon.client() as c:
        r = c.post(f"/v1/sandboxes/{sandbox}/processes/p1/resize", json=body)
        assert r.status_code == 422, r.text


def test_bad_pty_requests_are_422(daemon: Daemon, sandbox: str) -> None:
    with daemon.client() as c:
        for body in ({"rows": 0}, {"cols": 1001}, {"cmd": "sh", "argv": ["sh"]}, {"tty": 1}):
            assert c.post(f"/v1/sandboxes/{sandbox}/pty", json=body).status_code == 422, body


def test_pty_session_keystrokes_resize_and_exit_code(daemon: Daemon, sandbox: str) -> None:
    with daemon.client() as c:
        r = c.post(f"/v1/sandboxes/{sandbox}/pty", json={"rows": 24, "cols": 80})
        assert r.status_code == 201, r.text
        proc = r.json()["proc_id"]
        base = f"/v1/sandboxes/{sandbox}/processes/{proc}"
        procs = c.get(f"/v1/sandboxes/{sandbox}/processes").json()["processes"]
        assert [p["pty"] for p in procs if p["proc_id"] == proc] == [True]
        assert c.post(base + "/stdin", content=b"stty size; echo TERM=$TERM\n").status_code == 200
        _wait_for(c, sandbox, proc, b"24 80\r\nTERM=xterm-256color")
        assert c.post(base + "/resize", json={"rows": 50, "cols": 132}).status_code == 200
        assert c.post(base + "/stdin", content=b"stty size\n").status_code == 200
        _wait_for(c, sandbox, proc, b"50 132")
        assert c.post(base + "/stdin", content=b"exit 3\n").status_code == 200
        _, last = _output(c, sandbox, proc)
        assert last["type"] == "exit" and last["exit_code"] == 3, last
        # Ended: resize and stdin are a clear 409.
        assert c.post(base + "/resize", json={"rows": 10, "cols": 10}).status_code == 409
        assert c.post(base + "/stdin", content=b"x").status_code == 409


def test_close_stdin_on_a_terminal_ends_one_input_not_the_terminal(
    daemon: Daemon, sandbox: str
) -> None:
    # ^D ends the input of the program reading the terminal; what comes after goes to the
    # next reader (it was lost: the daemon queued it on the pipe the ^D had closed).
    with daemon.client() as c:
        cmd = "cat; echo CAT-$?; read line; echo GOT-$line"
        r = c.post(f"/v1/sandboxes/{sandbox}/pty", json={"cmd": cmd})
        assert r.status_code == 201, r.text
        proc = r.json()["proc_id"]
        base = f"/v1/sandboxes/{sandbox}/processes/{proc}"
        assert c.post(base + "/stdin", content=b"to-cat\n").status_code == 200
        _wait_for(c, sandbox, proc, b"to-cat\r\nto-cat\r\n")  # the echo, then cat's copy
        assert c.post(base + "/stdin/close").status_code == 200
        r = c.post(base + "/stdin", content=b"after\n", timeout=10)
        assert r.status_code == 200, (r.text, _output(c, sandbox, proc))
        out, last = _output(c, sandbox, proc)
        assert b"CAT-0\r\n" in out and b"GOT-after\r\n" in out, out
        assert last["type"] == "exit" and last["exit_code"] == 0, last


def test_close_stdin_on_a_terminal_after_a_partial_line_ends_the_input(
    daemon: Daemon, sandbox: str
) -> None:
    # One ^D after "partial" (no newline) only hands the line over: cat read on until the
    # timeout. Two follow a partial line.
    with daemon.client() as c:
        r = c.post(f"/v1/sandboxes/{sandbox}/pty", json={"cmd": "cat; echo CAT-$?"})
        assert r.status_code == 201, r.text
        proc = r.json()["proc_id"]
        base = f"/v1/sandboxes/{sandbox}/processes/{proc}"
        assert c.post(base + "/stdin", content=b"partial").status_code == 200
        assert c.post(base + "/stdin/close").status_code == 200
        out, last = _output(c, sandbox, proc)
        assert b"CAT-0\r\n" in out, out
        assert last["type"] == "exit" and last["exit_code"] == 0, last


def test_other_tenant_gets_404_on_stdin_pty_routes(daemon: Daemon, sandbox: str) -> None:
    with daemon.client() as c:
        key = c.post("/v1/keys", json={"name": "other"}).json()["key"]
        proc = _spawn(c, sandbox, cmd="sleep 30", open_stdin=True, pty={"rows": 5, "cols": 5})
    s = f"/v1/sandboxes/{sandbox}"
    with daemon.tcp(key) as t:
        assert t.post(f"{s}/processes/{proc}/stdin", content=b"x").status_code == 404
        assert t.post(f"{s}/processes/{proc}/stdin/close").status_code == 404
        r = t.post(f"{s}/processes/{proc}/resize", json={"rows": 9, "cols": 9})
        assert r.status_code == 404
        assert t.post(f"{s}/pty", json={}).status_code == 404
    with daemon.client() as c:
        c.post(f"{s}/processes/{proc}/kill", json={"grace": 0})
