"""Request bodies the daemon must refuse with a clear 4xx, without holding them in memory
first and without a 500. A daemon of its own (no VM), so its peak memory is this test's."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import Daemon, running_daemon

from isorun.daemon.http import EXEC_BODY_LIMIT, JSON_BODY_LIMIT


@pytest.fixture
def fresh(tmp_path: Path, busybox_rootfs: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path / "d") as d:
        yield d


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_oversized_json_body_is_refused_without_buffering_it(fresh: Daemon) -> None:
    assert fresh.proc is not None
    before = _peak_rss(fresh.proc.pid)
    total = EXEC_BODY_LIMIT + (200 << 20)

    def body() -> Iterator[bytes]:  # chunked: no Content-Length to refuse it by
        chunk = b" " * (1 << 20)
        for _ in range(total >> 20):
            yield chunk

    with fresh.client() as c:
        for path, limit in (
            ("/v1/sandboxes", JSON_BODY_LIMIT),
            ("/v1/sandboxes/sb-x/exec", EXEC_BODY_LIMIT),
        ):
            r = c.post(path, content=body())
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "too_large"
            assert str(limit) in r.json()["error"]["message"]
        # With a Content-Length over the limit it is refused from the header alone.
        r = c.post("/v1/sandboxes", content=b" " * (JSON_BODY_LIMIT + 1))
        assert r.status_code == 413, r.text
        assert c.get("/v1/health").status_code == 200
    # At most the limit itself is held (then refused), not the 300 MiB that were sent.
    grown = _peak_rss(fresh.proc.pid) - before
    assert grown < EXEC_BODY_LIMIT + (48 << 20), f"daemon peak memory grew {grown >> 20} MiB"


def test_deeply_nested_json_is_a_400_not_a_500(fresh: Daemon) -> None:
    deep = b'{"image": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with fresh.client() as c:
        r = c.post("/v1/sandboxes", content=deep)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "malformed_json"
        assert "nests too deeply" in r.json()["error"]["message"]
        assert c.get("/v1/sandboxes").json()["sandboxes"] == []


def test_only_exec_stdin_may_make_a_body_large(fresh: Daemon) -> None:
    """Every JSON body could be 96 MiB: 90 MiB of tiny items sent to any route (a sandbox
    that does not exist will do) held the event loop ~9 s and took 1.1 GiB. Now a body is
    at most 1 MiB, and an exec body past that may only carry a long `stdin`."""
    tiny_items = b'{"x": [' + b"0," * (2 << 20) + b"0]}"  # 4 MiB, 2M items
    with fresh.client() as c:
        r = c.post("/v1/sandboxes/sb-x/timeout", content=tiny_items)
        assert r.status_code == 413, r.text
        assert f"limit for a SetTimeout JSON body is {JSON_BODY_LIMIT}" in r.text
        r = c.post("/v1/sandboxes/sb-x/exec", content=tiny_items)
        assert r.status_code == 413, r.text
        assert "only a long `stdin` may make a body large" in r.json()["error"]["message"]
        # a long stdin still passes the body checks: the sandbox is what is missing
        stdin = base64.b64encode(os.urandom(8 << 20)).decode()
        r = c.post("/v1/sandboxes/sb-x/exec", json={"cmd": "cat", "stdin": stdin})
        assert r.status_code == 404, r.text
        assert c.get("/v1/health").status_code == 200


@pytest.mark.parametrize(
    ("method", "url", "says"),
    [
        # each was taken, its answer looking right: a plain create, a foreground exec, a
        # replay from offset 0, a listing of depth 10, the last of two paths
        ("POST", "/v1/sandboxes?progres=1", "unknown query parameter 'progres'"),
        ("POST", "/v1/sandboxes/sb/exec?background=1", "unknown query parameter 'background'"),
        ("GET", "/v1/sandboxes/sb/processes/p1/stream?ofset=4", "unknown query parameter 'ofset'"),
        ("GET", "/v1/sandboxes/sb/files/list?path=/&depth=1_0", "depth='1_0' is not an integer"),
        ("GET", "/v1/sandboxes/sb/files/list?path=/&depth=%2B2", "depth='+2' is not an integer"),
        ("GET", "/v1/sandboxes/sb/files/list?path=/a&path=/b", "'path' is given more than once"),
    ],
)
def test_a_query_parameter_misspelt_loose_or_repeated_is_refused(
    fresh: Daemon, method: str, url: str, says: str
) -> None:
    with fresh.client() as c:
        r = c.request(method, url, json={"image": "none"} if method == "POST" else None)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid" and says in r.json()["error"]["message"]
