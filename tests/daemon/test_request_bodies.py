"""Request bodies the daemon must refuse with a clear 4xx, without holding them in memory
first and without a 500. A daemon of its own (no VM), so its peak memory is this test's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import Daemon, running_daemon

from isorun.daemon.app import MAX_JSON_BODY


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
    total = MAX_JSON_BODY + (200 << 20)

    def body() -> Iterator[bytes]:  # chunked: no Content-Length to refuse it by
        chunk = b" " * (1 << 20)
        for _ in range(total >> 20):
            yield chunk

    with fresh.client() as c:
        for path in ("/v1/sandboxes", "/v1/sandboxes/sb-x/exec"):
            r = c.post(path, content=body())
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "too_large"
            assert str(MAX_JSON_BODY) in r.json()["error"]["message"]
        # With a Content-Length over the limit it is refused from the header alone.
        r = c.post("/v1/sandboxes", content=b" " * (MAX_JSON_BODY + 1))
        assert r.status_code == 413, r.text
        assert c.get("/v1/health").status_code == 200
    # At most the limit itself is held (then refused), not the 300 MiB that were sent.
    grown = _peak_rss(fresh.proc.pid) - before
    assert grown < MAX_JSON_BODY + (48 << 20), f"daemon peak memory grew {grown >> 20} MiB"


def test_deeply_nested_json_is_a_400_not_a_500(fresh: Daemon) -> None:
    deep = b'{"image": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with fresh.client() as c:
        r = c.post("/v1/sandboxes", content=deep)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "malformed_json"
        assert "nests too deeply" in r.json()["error"]["message"]
        assert c.get("/v1/sandboxes").json()["sandboxes"] == []
