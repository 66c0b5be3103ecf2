"""The HTTP API against a real daemon and a real guest (one shared sandbox)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest
from daemonhelpers import Daemon, ndjson
from numbered import numbered, numbered_cmd

from isorun.daemon.openapi import render

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]


def test_committed_openapi_matches_the_app(daemon: Daemon) -> None:
    committed = (REPO / "openapi.json").read_text()
    assert committed == render(), "regenerate: python -m isorun.daemon.openapi > openapi.json"
    with daemon.client() as c:
        assert c.get("/openapi.json").json() == json.loads(committed)


def test_exec_answers_as_its_openapi_says(daemon: Daemon, sandbox: str) -> None:
    # A background exec answers JSON {proc_id, pid}, which the spec left out (it declared
    # only the NDJSON stream).
    spec = json.loads((REPO / "openapi.json").read_text())
    declared = spec["paths"]["/v1/sandboxes/{sid}/exec"]["post"]["responses"]["200"]
    with daemon.client() as c:
        r = c.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": "true", "background": True})
        kind = r.headers["content-type"].split(";")[0]
        assert kind in declared["content"], (kind, list(declared["content"]))
        schema = declared["content"][kind]["schema"]
        assert set(schema["required"]) <= set(r.json()), r.json()


def test_socket_is_private(daemon: Daemon) -> None:
    assert daemon.sock.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"image": "base", "colour": "red"}', 422, "colour"),
        (b'{"vcpus": "two"}', 422, "vcpus"),
        (b'{"memory_mib": -5}', 422, "memory_mib"),
        (b'{"memory_mib": 99999999999}', 422, "memory_mib"),
        (b'{"disk_mib": 0}', 422, "disk_mib"),
        (b'{"sandbox_timeout": -1}', 422, "sandbox_timeout"),
        (b'{"sandbox_timeout": 1e9}', 422, "sandbox_timeout"),
        (b'{"metadata": {"k": 5}}', 422, "metadata"),
        (b'{"image": "rootfs:/no/such.ext4"}', 404, "not found"),
        (b'{"image": "Not A Valid Ref!!"}', 400, "invalid image"),
        (b'{"vcpus": 64}', 503, "host is full"),
    ],
)
def test_bad_create_requests_get_clear_4xx(
    daemon: Daemon, body: bytes, status: int, needle: str
) -> None:
    with daemon.client() as c:
        known = c.get("/v1/sandboxes", params={"all": "1"}).json()["sandboxes"]
        records = c.get("/v1/usage").json()["total"]["sandboxes"]
        r = c.post("/v1/sandboxes", content=body)
        assert r.status_code == status, r.text
        assert needle in r.json()["error"]["message"]
        # a refused create made no sandbox: none listed, not even ended, and no usage record
        assert c.get("/v1/sandboxes", params={"all": "1"}).json()["sandboxes"] == known
        assert c.get("/v1/usage").json()["total"]["sandboxes"] == records


def test_unknown_sandbox_and_route(daemon: Daemon) -> None:
    with daemon.client() as c:
        assert c.get("/v1/sandboxes/sb-nope").status_code == 404
        assert c.delete("/v1/sandboxes/sb-nope").status_code == 404
        assert c.post("/v1/sandboxes/sb-nope/exec", json={"cmd": "true"}).status_code == 404
        assert c.get("/v1/nothing").status_code == 404
        assert c.patch("/v1/sandboxes").status_code == 405


def test_tcp_needs_a_valid_key_and_tenants_are_isolated(daemon: Daemon, sandbox: str) -> None:
    with daemon.tcp() as t:
        assert t.get("/v1/health").status_code == 200
        r = t.get("/v1/sandboxes")
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    with daemon.tcp("isr_abc_wrong") as t:
        assert t.get("/v1/sandboxes").status_code == 401
    with daemon.client() as c:
        key = c.post("/v1/keys", json={"name": "tenant-a"}).json()
        assert key["key"].startswith("isr_")
        # Hashed at rest: the secret is nowhere in the database.
        db = (daemon.state / "isorund.db").read_bytes()
        assert key["key"].split("_", 2)[2].encode() not in db
    with daemon.tcp(key["key"]) as t:
        assert t.get("/v1/sandboxes").json()["sandboxes"] == []
        # Another tenant's sandbox is 404, not 403, for every verb.
        assert t.get(f"/v1/sandboxes/{sandbox}").status_code == 404
        assert t.delete(f"/v1/sandboxes/{sandbox}").status_code == 404
        assert t.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": "id"}).status_code == 404
        assert (
            t.get(f"/v1/sandboxes/{sandbox}/files", params={"path": "/etc/passwd"}).status_code
            == 404
        )
        # Raw host paths as images are for local callers only.
        r = t.post("/v1/sandboxes", json={"image": "rootfs:/etc/shadow"})
        assert r.status_code == 403
        assert t.post("/v1/keys", json={}).status_code == 403
    with daemon.client() as c:
        assert c.delete(f"/v1/keys/{key['id']}").status_code == 200
    with daemon.tcp(key["key"]) as t:
        assert t.get("/v1/sandboxes").status_code == 401


def test_no_api_key_can_be_the_local_admin(daemon: Daemon, sandbox: str) -> None:
    """The admin is the unix socket's tenant `local`; a key minted for it gave its powers
    (keys, images, the local sandboxes, host-path images) to anyone over TCP."""
    with daemon.client() as c:
        r = c.post("/v1/keys", json={"tenant_id": "local", "name": "x"})
        assert r.status_code == 422 and "'local' is reserved" in r.text, r.text
        assert [k for k in c.get("/v1/keys").json()["keys"] if k["tenant_id"] == "local"] == []
    # one minted before the name was reserved is refused
    secret = "s" * 43
    db = sqlite3.connect(daemon.state / "isorund.db")
    with db:
        db.execute(
            "INSERT INTO api_keys(id, tenant_id, hash, name, created) VALUES (?,?,?,?,?)",
            ("0123456789ab", "local", hashlib.sha256(secret.encode()).hexdigest(), "old", 0),
        )
    db.close()
    with daemon.tcp(f"isr_0123456789ab_{secret}") as t:
        assert t.get(f"/v1/sandboxes/{sandbox}").status_code == 401
        assert t.get("/v1/keys").status_code == 401


def test_a_tcp_request_whose_connection_was_reset_is_not_the_local_admin(daemon: Daemon) -> None:
    # A request sent, then the connection reset before the daemon took it up: the daemon
    # still reads the request, but has no peer address for it. That used to mean the unix
    # socket: the admin, without a key (here: an API key minted by anyone over TCP).
    body = json.dumps({"name": "made-without-a-key"}).encode()
    request = (
        b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", daemon.port)) as s:
            s.sendall(request)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.02)
    time.sleep(1)
    with daemon.client() as c:
        made = [k for k in c.get("/v1/keys").json()["keys"] if k["name"] == "made-without-a-key"]
    assert made == []


def test_exec_streams_ndjson_in_order_with_exit_record(daemon: Daemon, sandbox: str) -> None:
    arrivals: list[tuple[float, dict[str, object]]] = []
    t0 = time.monotonic()
    with (
        daemon.client() as c,
        c.stream(
            "POST",
            f"/v1/sandboxes/{sandbox}/exec",
            json={"cmd": "echo one; sleep 1; echo two >&2; sleep 1; echo three; exit 7"},
        ) as r,
    ):
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            arrivals.append((time.monotonic() - t0, json.loads(line)))
    kinds = [e["type"] for _, e in arrivals]
    assert kinds == ["start", "stdout", "stderr", "stdout", "exit"]
    data = [base64.b64decode(str(e["data"])) for _, e in arrivals if "data" in e]
    assert data == [b"one\n", b"two\n", b"three\n"]
    assert arrivals[2][0] - arrivals[1][0] > 0.3  # streamed, not buffered to the end
    assert arrivals[-1][1]["exit_code"] == 7


def test_exec_stdin_argv_env_cwd_user_timeout(daemon: Daemon, sandbox: str) -> None:
    with daemon.client() as c:
        p = f"/v1/sandboxes/{sandbox}/exec"
        ev = ndjson(
            c.post(p, json={"argv": ["cat"], "stdin": base64.b64encode(b"\x00\xffhi").decode()})
        )
        assert base64.b64decode(ev[1]["data"]) == b"\x00\xffhi"
        ev = ndjson(
            c.post(
                p,
                json={
                    "cmd": 'echo "$A $(pwd) $(id -u)"',
                    "env": {"A": "x"},
                    "cwd": "/tmp",
                    "user": "user",
                },
            )
        )
        assert base64.b64decode(ev[1]["data"]) == b"x /tmp 1000\n"
        ev = ndjson(c.post(p, json={"cmd": "sleep 30", "timeout": 1}))
        assert ev[-1]["timed_out"] is True
        for bad in (
            {},
            {"cmd": "a", "argv": ["b"]},
            {"cmd": ""},
            {"cmd": "x", "stdin": "@@@"},
            {"cmd": "x", "timeout": -1},
            {"cmd": "x", "env": {"A": 1}},
        ):
            r = c.post(p, json=bad)
            assert r.status_code == 422, (bad, r.text)


def test_a_command_too_big_for_the_agent_is_a_413_that_says_what_to_do(
    daemon: Daemon, sandbox: str
) -> None:
    """The API takes a 1 MiB command; the guest reads a request from one 64 KiB frame. A
    script written with a heredoc was a 500 "internal error: ValueError" before."""
    heredoc = "cat > /tmp/data.csv <<'EOF'\n" + "1,2,3,4,5,6,7,8\n" * 5000 + "EOF\n"
    with daemon.client() as c:
        p = f"/v1/sandboxes/{sandbox}/exec"
        # a foreground exec streams, so its error is the stream's record
        (err,) = ndjson(c.post(p, json={"cmd": heredoc}))
        assert err["type"] == "error" and err["status"] == 413, err
        r = c.post(p, json={"cmd": heredoc, "background": True})
        assert r.status_code == 413, r.text
        for e in (err, r.json()["error"]):
            assert e["code"] == "too_large"
            assert "65536" in e["message"] and "stdin" in e["message"], e
        # the same bytes as stdin arrive whole, and the sandbox is unharmed
        stdin = base64.b64encode(heredoc.encode()).decode()
        ev = ndjson(c.post(p, json={"argv": ["wc", "-c"], "stdin": stdin}))
        assert base64.b64decode(ev[1]["data"]).strip() == str(len(heredoc)).encode()


def test_client_drop_mid_exec_loses_nothing(daemon: Daemon, sandbox: str) -> None:
    with daemon.client() as c:
        with c.stream(
            "POST",
            f"/v1/sandboxes/{sandbox}/exec",
            json={"cmd": "for i in 1 2 3 4; do echo $i; sleep 0.4; done"},
        ) as r:
            first = json.loads(next(r.iter_lines()))
            assert first["type"] == "start"
        # The stream is gone; the command runs on. Reattach and replay from offset 0.
        r = c.get(f"/v1/sandboxes/{sandbox}/processes/{first['proc_id']}/stream")
        ev = ndjson(r)
        out = b"".join(base64.b64decode(e["data"]) for e in ev if e["type"] == "stdout")
        assert out == b"1\n2\n3\n4\n"
        assert ev[-1]["type"] == "exit" and ev[-1]["exit_code"] == 0
        # From an offset: only what follows it.
        ev = ndjson(
            c.get(
                f"/v1/sandboxes/{sandbox}/processes/{first['proc_id']}/stream", params={"offset": 4}
            )
        )
        assert (
            b"".join(base64.b64decode(e["data"]) for e in ev if e["type"] == "stdout") == b"3\n4\n"
        )


def test_a_process_stream_says_attached_first_though_nothing_is_written(
    daemon: Daemon, sandbox: str
) -> None:
    """docs/api.md: a process stream has `attached` first. It came only with the first
    output: a silent process's stream (or a resume from the end) had none, only `exit`."""
    base = f"/v1/sandboxes/{sandbox}"
    with daemon.client() as c:
        quiet = c.post(base + "/exec", json={"cmd": "sleep 1", "background": True}).json()
        loud = c.post(base + "/exec", json={"cmd": "echo hi", "background": True}).json()
        for proc, offset, want in ((quiet, 0, 0), (loud, 3, 3)):
            with c.stream(
                "GET", f"{base}/processes/{proc['proc_id']}/stream", params={"offset": offset}
            ) as r:
                lines = r.iter_lines()  # the first record as soon as it comes
                first = json.loads(next(lines))
                assert first == {"type": "attached", "offset": want, "lost": 0}, first
                rest = [json.loads(line) for line in lines if line.strip()]
            assert [e["type"] for e in rest if e["type"] != "keepalive"] == ["exit"], rest


def test_background_process_list_signal_kill(daemon: Daemon, sandbox: str) -> None:
    with daemon.client() as c:
        base = f"/v1/sandboxes/{sandbox}"
        r = c.post(base + "/exec", json={"cmd": "echo up; sleep 1000", "background": True})
        assert r.status_code == 200
        proc = r.json()["proc_id"]
        procs = {p["proc_id"]: p for p in c.get(base + "/processes").json()["processes"]}
        assert procs[proc]["running"] is True
        assert c.post(base + f"/processes/{proc}/kill", json={"grace": 0.5}).json()["signal"]
        assert c.post(base + "/processes/p999/kill", json={}).status_code == 404
        assert c.get(base + "/processes/p999/stream").status_code == 404
        assert c.get(base + f"/processes/{proc}/stream", params={"offset": -1}).status_code == 400


def test_files_roundtrip_and_errors(daemon: Daemon, sandbox: str) -> None:
    with daemon.client() as c:
        f = f"/v1/sandboxes/{sandbox}/files"
        blob = bytes(range(256)) * 8192  # 2 MiB, streamed both ways
        r = c.put(
            f, params={"path": "/tmp/d/blob.bin"}, content=iter([blob[: 1 << 20], blob[1 << 20 :]])
        )
        assert r.json()["bytes"] == len(blob)
        assert c.get(f, params={"path": "/tmp/d/blob.bin"}).content == blob
        assert c.get(f + "/stat", params={"path": "/tmp/d/blob.bin"}).json()["size"] == len(blob)
        assert c.post(f + "/mkdir", json={"path": "/tmp/d/sub"}).status_code == 200
        assert (
            c.post(
                f + "/rename", json={"src": "/tmp/d/blob.bin", "dst": "/tmp/d/sub/b"}
            ).status_code
            == 200
        )
        names = {
            e["name"]
            for e in c.get(f + "/list", params={"path": "/tmp/d", "depth": 2}).json()["entries"]
        }
        assert {"sub", "b"} <= names
        assert c.post(f + "/remove", json={"path": "/tmp/d", "recursive": True}).status_code == 200
        r = c.get(f, params={"path": "/tmp/d/sub/b"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert c.get(f).status_code == 400  # no path
        assert c.get(f + "/list", params={"path": "/", "depth": 1000}).status_code == 400
        assert c.post(f + "/mkdir", json={"path": "/x", "extra": 1}).status_code == 422
        # ?mode= is octal written as octal, as chmod reads it (0o755, 0755); a bare number
        # is refused rather than guessed (644 read as decimal was 0o1204)
        for given, want in (("0755", 0o755), ("0o600", 0o600), ("0O4755", 0o4755), ("0", 0)):
            r = c.put(f, params={"path": "/tmp/m", "mode": given}, content=b"m")
            assert r.status_code == 200, (given, r.text)
            mode = c.get(f + "/stat", params={"path": "/tmp/m"}).json()["mode"]
            assert mode & 0o7777 == want, (given, oct(mode))
        for bad in ("0o8", "0x1ed", "rwx", "0o17777", "-1", "0o", "0o-1", "0 7", "0o+7", "٣"):
            r = c.put(f, params={"path": "/tmp/m", "mode": bad}, content=b"m")
            assert r.status_code == 400 and "mode" in r.json()["error"]["message"], (bad, r.text)
        for bare in ("644", "420"):
            r = c.put(f, params={"path": "/tmp/m", "mode": bare}, content=b"m")
            message = r.json()["error"]["message"]
            assert r.status_code == 400 and f"mode=0{bare} or mode=0o{bare}" in message, r.text
        # A trailing slash names a directory: no file made for it, none reached through it.
        r = c.put(f, params={"path": "/tmp/newdir/"}, content=b"x")
        assert r.status_code == 400 and r.json()["error"]["code"] == "guest_is_dir", r.text
        assert c.get(f + "/stat", params={"path": "/tmp/newdir"}).status_code == 404
        r = c.get(f + "/stat", params={"path": "/tmp/m/"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "guest_not_dir", r.text
        # A full disk in the sandbox is the sandbox's 507 (the old file intact), a rename
        # across its filesystems a 409: each names itself, neither is a 500.
        mount = "mkdir -p /mnt/small && mount -t tmpfs -o size=64k tmpfs /mnt/small"
        run = ndjson(c.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": mount}))
        assert run[-1]["exit_code"] == 0, run
        assert c.put(f, params={"path": "/mnt/small/f"}, content=b"old").status_code == 200
        r = c.put(f, params={"path": "/mnt/small/f"}, content=b"x" * (256 << 10))
        assert r.status_code == 507 and r.json()["error"]["code"] == "guest_no_space", r.text
        assert c.get(f, params={"path": "/mnt/small/f"}).content == b"old"
        r = c.post(f + "/rename", json={"src": "/mnt/small/f", "dst": "/tmp/f"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "guest_cross_device", r.text
        assert "different filesystems" in r.json()["error"]["message"]


def test_query_flags_are_strict_and_unknown_ones_refused(daemon: Daemon, sandbox: str) -> None:
    """`append=yes`, `append=on` or a misspelt `apend=1` used to be read as "no append":
    200, and the file silently replaced. Now they are 400 and the file is as it was."""
    with daemon.client() as c:
        f = f"/v1/sandboxes/{sandbox}/files"
        assert c.put(f, params={"path": "/tmp/log"}, content=b"one\n").status_code == 200
        # what Python's requests sends for params={"append": True}
        r = c.put(f, params={"path": "/tmp/log", "append": "True"}, content=b"two\n")
        assert r.status_code == 200, r.text
        for bad, says in (
            ({"append": "yes"}, "append='yes' must be 1, true, 0 or false"),
            ({"apend": "1"}, "unknown query parameter 'apend'; this route takes path, mode"),
        ):
            r = c.put(f, params={"path": "/tmp/log", **bad}, content=b"lost\n")
            assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
        assert c.get(f, params={"path": "/tmp/log"}).content == b"one\ntwo\n"
        r = c.get(f + "/watch", params={"path": "/tmp", "recursive": "maybe"})
        assert r.status_code == 400 and "recursive='maybe'" in r.text
        r = c.get(f + "/list", params={"path": "/tmp", "deep": "2"})
        assert r.status_code == 400 and "takes path, depth" in r.text
        for since in ("nan", "inf"):
            r = c.get("/v1/usage", params={"since": since})
            assert r.status_code == 400 and "must be a unix timestamp" in r.text


def test_a_path_that_is_not_utf8_names_that_file(daemon: Daemon, sandbox: str) -> None:
    """`?path=/tmp/caf%E9` (a Latin-1 name) reached the guest as `/tmp/caf\ufffd`: a write
    made a file of another name and a read said 404 for the wrong one. Such a byte now
    travels as Python holds it (the lone surrogate U+DC80+byte, "\\udce9" in JSON), in
    queries, bodies, listings and watches alike."""
    f = f"/v1/sandboxes/{sandbox}/files"
    latin = "/tmp/" + os.fsdecode(b"caf\xe9")
    with daemon.client() as c:
        assert c.put(f + "?path=/tmp/caf%E9", content=b"x").status_code == 200
        assert c.get(f + "?path=/tmp/caf%E9").content == b"x"
        seen = c.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": "printf %s /tmp/caf*"})
        assert base64.b64decode(ndjson(seen)[1]["data"]) == b"/tmp/caf\xe9", seen.text
        listing = c.get(f + "/list", params={"path": "/tmp"})
        assert b'"/tmp/caf\\udce9"' in listing.content  # ASCII JSON, not U+FFFD
        assert latin in [e["path"] for e in listing.json()["entries"]]
        # JSON bodies take the escape too (httpx would not encode a lone surrogate)
        moved = "/tmp/" + os.fsdecode(b"\xff")
        body = json.dumps({"src": latin, "dst": moved})
        assert c.post(f + "/rename", content=body).status_code == 200
        assert c.get(f + "?path=/tmp/%FF").content == b"x"
        r = c.post(f + "/rename", content=json.dumps({"src": "/tmp/\ud800", "dst": moved}))
        assert r.status_code == 422 and "stands for no byte" in r.text, r.text
        # "é" spelt as its two bytes' escapes: another spelling of a name, refused
        r = c.post(f + "/mkdir", content=json.dumps({"path": "/tmp/\udcc3\udca9"}))
        assert r.status_code == 422 and "escapes bytes that are UTF-8" in r.text, r.text
        assert c.post(f + "/remove", content=json.dumps({"path": moved})).status_code == 200
        assert c.get(f + "?path=/tmp/%FF").status_code == 404
        # a real U+FFFD, and UTF-8 names, are names like any
        for name in ("caf\ufffd", "caf\u00e9"):
            r = c.put(f, params={"path": f"/tmp/{name}"}, content=b"y")
            assert r.status_code == 200, r.text
            assert c.get(f, params={"path": f"/tmp/{name}"}).content == b"y"


def test_head_of_a_file_sends_its_size_and_of_a_stream_is_refused(
    daemon: Daemon, sandbox: str
) -> None:
    f = f"/v1/sandboxes/{sandbox}/files"
    with daemon.client() as c:
        assert c.put(f, params={"path": "/tmp/h/eleven"}, content=b"eleven byte").status_code == 200
        r = c.head(f, params={"path": "/tmp/h/eleven"})
        assert r.status_code == 200 and r.headers["content-length"] == "11", r.headers
        assert c.head(f, params={"path": "/tmp/h/none"}).status_code == 404
        assert c.head(f, params={"path": "/tmp/h"}).status_code == 400  # a directory, as GET
        # a pseudo-file's size says nothing of what it holds: no length rather than 0
        r = c.head(f, params={"path": "/proc/self/status"})
        assert r.status_code == 200 and "content-length" not in r.headers, r.headers
        # a stream's HEAD would start it (a watch, an attach) and hold the connection until
        # the client hung up: refused, and the same connection serves the next request
        for stream in (f + "/watch?path=/tmp", f"/v1/sandboxes/{sandbox}/processes/p1/stream"):
            r = c.head(stream, timeout=10)
            assert r.status_code == 405 and r.headers["allow"] == "GET", (stream, r.text)
        assert c.get(f, params={"path": "/tmp/h/eleven"}, timeout=10).content == b"eleven byte"


def test_an_upload_cut_off_keeps_the_old_file_and_logs_no_traceback(
    daemon: Daemon, sandbox: str
) -> None:
    f = f"/v1/sandboxes/{sandbox}/files"
    with daemon.client() as c:
        assert c.put(f, params={"path": "/tmp/kept"}, content=b"ORIGINAL").status_code == 200
        for cut, (framing, body) in enumerate(
            (
                ("Content-Length: 1000000", b"z" * 500_000),
                ("Transfer-Encoding: chunked", b"10\r\n" + b"q" * 16 + b"\r\n"),
            ),
            start=1,
        ):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(daemon.sock))
                head = f"PUT {f}?path=/tmp/kept HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n"
                s.sendall(head.encode() + body)
                time.sleep(0.3)
            deadline = time.monotonic() + 10
            while (
                daemon.log().count("client disconnected in the middle") < cut
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
            assert c.get(f, params={"path": "/tmp/kept"}).content == b"ORIGINAL"
        # the cut uploads' temporary files are removed (the guest may be a moment behind)
        deadline = time.monotonic() + 10
        while True:
            listing = c.get(f + "/list", params={"path": "/tmp"}).json()["entries"]
            left = [e["name"] for e in listing if ".isorun-" in e["name"]]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not left, left
    assert daemon.log().count("client disconnected in the middle") == 2
    assert "unhandled error" not in daemon.log() and "Traceback" not in daemon.log()


def test_list_filters_by_metadata(daemon: Daemon, sandbox: str) -> None:
    with daemon.client() as c:
        ids = [
            s["id"]
            for s in c.get("/v1/sandboxes", params={"metadata.suite": "daemon"}).json()["sandboxes"]
        ]
        assert ids == [sandbox]
        assert c.get("/v1/sandboxes", params={"metadata.suite": "other"}).json()["sandboxes"] == []
        assert c.get("/v1/sandboxes", params={"bogus": "1"}).status_code == 400


def test_timeout_reaps_and_kill_reports_usage(daemon: Daemon, image: str) -> None:
    with daemon.client() as c:
        a = c.post("/v1/sandboxes", json={"image": image, "sandbox_timeout": 600}).json()["id"]
        b = c.post("/v1/sandboxes", json={"image": image, "sandbox_timeout": 600}).json()["id"]
        assert c.post(f"/v1/sandboxes/{a}/timeout", json={"sandbox_timeout": 3}).status_code == 200
        assert c.post(f"/v1/sandboxes/{a}/timeout", json={"sandbox_timeout": 0}).status_code == 422
        # a command running when the timeout ends the sandbox is told why
        cut = ndjson(c.post(f"/v1/sandboxes/{a}/exec", json={"cmd": "sleep 30"}, timeout=30))
        assert cut[-1]["type"] == "error" and cut[-1]["status"] == 410, cut[-1]
        assert "timeout" in cut[-1]["message"], cut[-1]
        deadline = time.monotonic() + 15
        while c.get(f"/v1/sandboxes/{a}").json()["state"] != "ended":
            assert time.monotonic() < deadline, "reaper did not end the sandbox"
            time.sleep(0.2)
        info = c.get(f"/v1/sandboxes/{a}").json()
        assert info["end_reason"] == "timeout"
        r = c.post(f"/v1/sandboxes/{a}/exec", json={"cmd": "true"})
        assert r.status_code == 410 and "timeout" in r.json()["error"]["message"]
        ndjson(
            c.post(
                f"/v1/sandboxes/{b}/exec",
                json={"cmd": "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"},
            )
        )
        usage = c.delete(f"/v1/sandboxes/{b}").json()
        assert usage["cpu_ms"] > 0 and usage["mem_peak_bytes"] > 1 << 20
        assert usage["uptime_ms"] > 0
        assert usage["billed_seconds"] == -(-usage["uptime_ms"] // 1000)
        assert c.delete(f"/v1/sandboxes/{b}").status_code == 410
        rec = {r["sandbox_id"]: r for r in c.get("/v1/usage").json()["records"]}
        assert rec[b]["cpu_ms"] == usage["cpu_ms"]
        assert rec[a]["uptime_ms"] > 0
        assert abs(rec[b]["cost_usd"] - rec[b]["billed_seconds"] * 0.041 / 3600) < 1e-9


def test_malformed_query_values(daemon: Daemon) -> None:
    with daemon.client() as c:
        assert c.get("/v1/usage", params={"since": "yesterday"}).status_code == 400
        # a misspelt parameter is named, not ignored (which answered every record)
        r = c.get("/v1/usage", params={"sinse": "1"})
        assert r.status_code == 400 and "'sinse'" in r.json()["error"]["message"], r.text


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_slow_reader_holds_back_the_guest_instead_of_filling_daemon_memory(
    daemon: Daemon, sandbox: str
) -> None:
    assert daemon.proc is not None
    total = 40 * 2**20
    with (
        daemon.client() as c,
        c.stream(
            "POST",
            f"/v1/sandboxes/{sandbox}/exec",
            json={"cmd": f"dd if=/dev/zero bs=65536 count={total // 65536} 2>/dev/null"},
        ) as r,
    ):
        lines = r.iter_lines()
        assert json.loads(next(lines))["type"] == "start"
        before = _rss_bytes(daemon.proc.pid)
        time.sleep(4)  # a reader that stalls while the guest could produce ~80 MB
        grown = _rss_bytes(daemon.proc.pid) - before
        got = 0
        last: dict[str, object] = {}
        for line in lines:
            last = json.loads(line)
            if last["type"] == "stdout":
                got += len(base64.b64decode(str(last["data"])))
    assert last["type"] == "exit" and last["exit_code"] == 0
    assert got == total  # nothing dropped
    assert grown < 24 * 2**20, f"daemon grew {grown} bytes while the reader stalled"


def test_a_reader_skipped_ahead_is_told_where_the_output_goes_on(
    daemon: Daemon, sandbox: str
) -> None:
    """A background process's stream never waits for a slow reader: the guest skips it ahead
    (a gap). That was said only in the exit record (`gap_bytes`), so a client counting the
    bytes it got could not know where it was. A `gap` record comes where it happens."""
    total = 1_600_000  # past the ring (1 MiB): a gap
    base = f"/v1/sandboxes/{sandbox}"
    with daemon.client() as c:
        proc = c.post(f"{base}/exec", json={"cmd": numbered_cmd(total), "background": True}).json()[
            "proc_id"
        ]
        with c.stream(
            "GET", f"{base}/processes/{proc}/stream", params={"offset": 0}, timeout=300
        ) as r:
            lines = r.iter_lines()
            recs = [json.loads(next(lines)) for _ in range(2)]
            assert [e["type"] for e in recs] == ["attached", "stdout"]
            while any(
                p["running"]
                for p in c.get(f"{base}/processes").json()["processes"]
                if p["proc_id"] == proc
            ):
                time.sleep(0.2)  # fall behind: the process writes all of it first
            recs += [json.loads(line) for line in lines]
    pos, gaps = recs[0]["offset"], 0
    for e in recs[1:]:
        if e["type"] == "stdout":
            data = base64.b64decode(str(e["data"]))
            assert data == numbered(pos, len(data)), pos  # every byte where it says it is
            pos += len(data)
        elif e["type"] == "gap":
            assert e["lost"] > 0 and e["offset"] == pos + e["lost"], (e, pos)
            pos, gaps = e["offset"], gaps + e["lost"]
    exit_ = recs[-1]
    assert exit_["type"] == "exit" and exit_["exit_code"] == 0
    assert gaps > 0 and exit_["gap_bytes"] == gaps and pos == total


def test_create_whose_client_went_away_leaves_no_running_vm(daemon: Daemon, image: str) -> None:
    """A client that gives up on POST /v1/sandboxes (timeout, ^C) never learns the id; the
    sandbox must not run on unowned until its timeout."""
    import httpx

    for tag, progress in (("plain", False), ("progress", True)):
        meta = {"abandon": tag}
        body = {"image": image, "metadata": meta, "sandbox_timeout": 3600}
        with daemon.client() as c:
            if progress:
                with c.stream("POST", "/v1/sandboxes?progress=1", json=body) as r:
                    assert json.loads(next(r.iter_lines()))["type"] == "progress"
            else:
                c.timeout = httpx.Timeout(0.05)
                with pytest.raises(httpx.TimeoutException):
                    c.post("/v1/sandboxes", json=body)
        with daemon.client() as c:
            deadline = time.monotonic() + 30
            while True:
                rows = c.get("/v1/sandboxes", params={"metadata.abandon": tag, "all": "1"}).json()[
                    "sandboxes"
                ]
                if rows and rows[0]["state"] == "ended":
                    break
                assert time.monotonic() < deadline, f"{tag}: abandoned sandbox still {rows}"
                time.sleep(0.2)
            assert len(rows) == 1 and rows[0]["end_reason"] == "abandoned", rows
            assert c.get("/v1/sandboxes", params={"metadata.abandon": tag}).json() == {
                "sandboxes": []
            }


def test_delete_of_a_starting_sandbox_ends_it_once_booted(daemon: Daemon, image: str) -> None:
    """The progress stream gives out the id before the sandbox runs; a DELETE then must end
    it (it was a 409, and a client that gave up then left it running)."""
    body = {"image": image, "metadata": {"case": "delete-while-starting"}}
    with daemon.client() as c, c.stream("POST", "/v1/sandboxes?progress=1", json=body) as r:
        lines = r.iter_lines()
        sid = None
        for line in lines:
            event = json.loads(line)
            if event.get("sandbox"):
                sid = event["sandbox"]
                break
        assert sid is not None, "the progress stream never named the sandbox"
        with daemon.client() as other:
            gone = other.delete(f"/v1/sandboxes/{sid}")
            assert gone.status_code == 200, gone.text
            assert gone.json()["uptime_ms"] >= 0
            info = other.get(f"/v1/sandboxes/{sid}").json()
            assert (info["state"], info["end_reason"]) == ("ended", "killed"), info
        list(lines)  # the creator's stream ends too
    with daemon.client() as c:
        assert c.get("/v1/sandboxes", params={"metadata.case": "delete-while-starting"}).json() == {
            "sandboxes": []
        }


def test_info_counts_a_sandbox_being_created_as_the_capacity_check_does(
    daemon: Daemon, image: str
) -> None:
    with daemon.client() as c:
        before = c.get("/v1/info").json()["capacity"]["vcpus_allocated"]
        known = {s["id"] for s in c.get("/v1/sandboxes").json()["sandboxes"]}
        created: list[httpx.Response] = []
        maker = threading.Thread(
            target=lambda: created.append(
                daemon.client().post("/v1/sandboxes", json={"image": image, "vcpus": 1})
            )
        )
        maker.start()
        seen_creating = False
        while maker.is_alive() and not seen_creating:
            new = [s for s in c.get("/v1/sandboxes").json()["sandboxes"] if s["id"] not in known]
            if new and new[0]["state"] == "creating":
                allocated = c.get("/v1/info").json()["capacity"]["vcpus_allocated"]
                still = c.get(f"/v1/sandboxes/{new[0]['id']}").json()["state"] == "creating"
                if still:  # it was being created when info answered
                    assert allocated == before + 1
                    seen_creating = True
            time.sleep(0.01)
        maker.join()
        assert seen_creating, "the create was over before it could be seen"
        c.delete(f"/v1/sandboxes/{created[0].json()['id']}")


def test_a_create_records_the_image_as_it_resolved_it(daemon: Daemon, image: str) -> None:
    # "base\n" started base (references are resolved stripped) but was recorded as sent
    with daemon.client() as c:
        r = c.post("/v1/sandboxes", json={"image": f" {image}\n"})
        assert r.status_code == 201, r.text
        assert r.json()["image"] == image
        assert c.get(f"/v1/sandboxes/{r.json()['id']}").json()["image"] == image
        c.delete(f"/v1/sandboxes/{r.json()['id']}")
