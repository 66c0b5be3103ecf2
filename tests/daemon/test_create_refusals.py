"""A create the daemon refuses before any work is a plain HTTP error, with or without
?progress=1 (docs/api.md: a malformed reference is a plain 400 before any stream starts).
A daemon of its own; no VM boots."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import Daemon, running_daemon


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path / "d", ISORUN_WARM_START="0") as d:
        yield d


@pytest.mark.parametrize(
    ("body", "local", "status", "code"),
    [
        ({"image": "bad ref!!"}, True, 400, "invalid_image"),
        ({"image": "base", "vcpus": 64}, True, 503, "capacity"),
        ({"image": "rootfs:/etc/hostname"}, False, 403, "forbidden"),
        ({"image": "oci-layout:/etc"}, False, 403, "forbidden"),
    ],
    ids=["bad-ref", "host-full", "tenant-raw-rootfs", "tenant-host-path"],
)
def test_a_create_refused_up_front_is_the_same_plain_error_with_progress(
    fresh: Daemon, body: dict[str, object], local: bool, status: int, code: str
) -> None:
    with fresh.client() as admin:
        key = None if local else admin.post("/v1/keys", json={"name": "t"}).json()["key"]
    with fresh.client() if local else fresh.tcp(key) as c:
        plain = c.post("/v1/sandboxes", json=body)
        streamed = c.post("/v1/sandboxes", params={"progress": "1"}, json=body)
        assert c.get("/v1/sandboxes", params={"all": "1"}).json()["sandboxes"] == []
    for r in (plain, streamed):
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json"), r.headers
        assert r.json()["error"]["code"] == code, r.text
    assert streamed.json() == plain.json()
