"""The warm-start template cache's own rules, on real files: a template is made once, and
old ones go by when they were last used (not by atime, which noatime mounts do not keep),
with their lock files, unless one is in use."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from isorun.images.locks import try_lock, unlock
from isorun.vmm import warm


async def test_old_templates_are_pruned_by_last_use_with_their_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISORUN_CACHE", str(tmp_path))
    d = warm.template_dir()
    d.mkdir(parents=True)
    long_ago = time.time() - warm.PRUNE_AFTER_S - 3600
    for key in ("unused", "restored", "busy"):
        warm.template_path(key).write_bytes(b"state")
        warm.template_path(key).with_suffix(".lock").touch()
        os.utime(warm.template_path(key), (long_ago, long_ago))
    with open(warm.template_path("restored"), "rb") as f:
        warm.mark_used(f.fileno())  # restored just now
    os.utime(warm.template_path("restored"), (long_ago, time.time()))  # noatime: atime stays
    held = try_lock(warm.template_path("busy").with_suffix(".lock"))
    assert held is not None

    made: list[Path] = []

    async def make(tmp: Path) -> None:
        made.append(tmp)
        tmp.write_bytes(b"new state")

    try:
        path, fresh = await warm.ensure_template("new", make)
    finally:
        unlock(held)
    assert fresh and path.read_bytes() == b"new state" and len(made) == 1
    assert sorted(p.name for p in d.iterdir()) == [
        "busy.lock",
        "busy.vmstate",
        "new.lock",
        "new.vmstate",
        "restored.lock",
        "restored.vmstate",
    ]
    assert await warm.ensure_template("new", make) == (path, False) and len(made) == 1


async def test_a_template_that_fails_to_make_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISORUN_CACHE", str(tmp_path))

    async def make(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await warm.ensure_template("k", make)
    assert [p.name for p in warm.template_dir().iterdir()] == ["k.lock"]
