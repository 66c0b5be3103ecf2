from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemonhelpers import Daemon, assert_no_leaks


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_rootfs: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("isorund"), ISORUN_DEFAULT_MEMORY_MIB="256").start()
    try:
        yield d
    finally:
        with d.client() as c:
            for sb in c.get("/v1/sandboxes").json().get("sandboxes", []):
                c.delete(f"/v1/sandboxes/{sb['id']}")
        d.stop()
        assert_no_leaks(d)


@pytest.fixture(scope="module")
def image(busybox_rootfs: Path) -> str:
    return f"rootfs:{busybox_rootfs}"


@pytest.fixture(scope="module")
def sandbox(daemon: Daemon, image: str) -> str:
    """One running sandbox shared by a module's tests (boots are slow under TCG)."""
    with daemon.client() as c:
        r = c.post("/v1/sandboxes", json={"image": image, "metadata": {"suite": "daemon"}})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])
