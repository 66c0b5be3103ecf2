"""Old guest builds leave the cache: every agent or kernel change builds anew under a new
hash, and without pruning the cache grew by a kernel or an initramfs per change."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

PRUNE = Path(__file__).resolve().parents[2] / "scripts" / "prune-guest-builds.sh"


def _builds(root: Path, count: int) -> list[Path]:
    """count build dirs, oldest first, a minute apart."""
    now = time.time()
    builds = []
    for i in range(count):
        build = root / f"{i:016x}"
        build.mkdir(parents=True)
        (build / "initramfs.cpio").write_bytes(b"cpio")
        os.utime(build, (now - 60 * (count - i), now - 60 * (count - i)))
        builds.append(build)
    return builds


def test_the_build_in_use_and_the_three_newest_others_are_kept(tmp_path: Path) -> None:
    builds = _builds(tmp_path / "initramfs", 7)
    in_use = builds[0] / "initramfs.cpio"  # the oldest: a user switched back to it
    result = subprocess.run([PRUNE, tmp_path / "initramfs", in_use], capture_output=True)
    assert result.returncode == 0, result.stderr
    left = sorted(p.name for p in (tmp_path / "initramfs").iterdir())
    assert left == sorted(b.name for b in [builds[0], *builds[-3:]])
    assert in_use.read_bytes() == b"cpio"


def test_nothing_to_prune_is_fine(tmp_path: Path) -> None:
    builds = _builds(tmp_path / "kernel", 2)
    result = subprocess.run([PRUNE, tmp_path / "kernel", builds[1] / "vmlinux"])
    assert result.returncode == 0
    assert sorted((tmp_path / "kernel").iterdir()) == builds
    absent = subprocess.run([PRUNE, tmp_path / "none", tmp_path / "none" / "x"])
    assert absent.returncode == 0
