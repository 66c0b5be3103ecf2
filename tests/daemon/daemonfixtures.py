"""Fixtures shared by the daemon, SDK and CLI suites: one real isorund per test module, the
busybox guest as its image, and a leak check when the module is done."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
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
def api(daemon: Daemon) -> str:
    return f"unix:{daemon.sock}"


@pytest.fixture(scope="module")
def image(busybox_rootfs: Path) -> str:
    return f"rootfs:{busybox_rootfs}"
