from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "daemon"))

from daemonhelpers import Daemon, assert_no_leaks


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_rootfs: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("isorund"), ISORUN_DEFAULT_MEMORY_MIB="256").start()
    try:
        yield d
    finally:
        d.stop()
        assert_no_leaks(d)


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> str:
    return f"unix:{daemon.sock}"


@pytest.fixture(scope="module")
def image(busybox_rootfs: Path) -> str:
    return f"rootfs:{busybox_rootfs}"
