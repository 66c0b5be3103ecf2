"""Fixtures shared by the daemon, SDK and CLI suites: one real isorund per test module, the
busybox guest as its image, and a leak check when the module is done."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import Daemon, running_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_rootfs: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("isorund")) as d:
        yield d


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> str:
    return f"unix:{daemon.sock}"


@pytest.fixture(scope="module")
def image(busybox_rootfs: Path) -> str:
    return f"rootfs:{busybox_rootfs}"
