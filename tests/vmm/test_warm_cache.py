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


@pytest.fixture
def templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty template dir of a cache of this test's own."""
    monkeypatch.setenv("ISORUN_CACHE", str(tmp_path))
    d = warm.template_dir()
    d.mkdir(parents=True)
    return d


def _saved(key: str, last_used: float) -> None:
    warm.template_path(key).write_bytes(b"state")
    os.utime(warm.template_path(key), (last_used, last_used))


async def _make(tmp: Path) -> None:
    tmp.write_bytes(b"new state")


async def test_old_templates_are_pruned_by_last_use_with_their_locks(templates: Path) -> None:
    d = templates
    long_ago = time.time() - warm.PRUNE_AFTER_S - 3600
    for key in ("unused", "restored", "busy"):
        _saved(key, long_ago)
        warm.template_path(key).with_suffix(".lock").touch()
    with open(warm.template_path("restored"), "rb") as f:
        warm.mark_used(f.fileno())  # restored just now (a noatime mount keeps the old atime)
    assert warm.template_path("restored").stat().st_mtime > time.time() - 60
    held = try_lock(warm.template_path("busy").with_suffix(".lock"))
    assert held is not None
    # Left by makes that failed or crashed long ago: a lock of a key never made, a
    # half-written state, a template guest's work dir.
    (d / "failed.lock").touch()
    (d / "crashed.tmp123").write_bytes(b"half")
    (d / "crashed.work").mkdir()
    for p in (d / "failed.lock", d / "crashed.tmp123", d / "crashed.work"):
        os.utime(p, (long_ago, long_ago))

    made: list[Path] = []

    async def make(tmp: Path) -> None:
        made.append(tmp)
        tmp.write_bytes(b"new state")

    try:
        got = await warm.ensure_template("new", make)
    finally:
        unlock(held)
    assert got is not None
    path, fresh = got
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


async def test_beyond_the_cap_the_least_recently_used_templates_go(templates: Path) -> None:
    # Every sandbox shape gets a template: a tenant cycling through memory sizes must not
    # fill the disk with them for 14 days.
    now = time.time()
    for i in range(warm.MAX_TEMPLATES + 3):
        _saved(f"t{i:02}", now - 1000 + i)
    assert await warm.ensure_template("new", _make) is not None
    kept = sorted(p.stem for p in templates.glob("*.vmstate"))
    assert len(kept) == warm.MAX_TEMPLATES and "new" in kept
    assert min(set(kept) - {"new"}) == "t04", "the least recently used were not the ones to go"


async def test_a_boot_does_not_wait_long_for_a_template_another_process_makes(
    templates: Path,
) -> None:
    made: list[Path] = []

    async def make(tmp: Path) -> None:
        made.append(tmp)
        tmp.write_bytes(b"state")

    lock = warm.template_path("k").with_suffix(".lock")
    held = try_lock(lock)  # another process, making it
    assert held is not None
    try:
        t0 = time.monotonic()
        assert await warm.ensure_template("k", make, wait_s=0.3) is None
        assert 0.3 <= time.monotonic() - t0 < 5 and not made
    finally:
        unlock(held)
    # Told not to make it (it failed here recently): no template, nothing made.
    assert await warm.ensure_template("k", make, may_make=lambda: False) is None
    assert not made and not warm.template_path("k").exists()


async def test_a_template_that_fails_to_make_leaves_nothing(templates: Path) -> None:
    async def make(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await warm.ensure_template("k", make)
    assert [p.name for p in templates.iterdir()] == ["k.lock"]


def test_a_kvm_template_is_keyed_to_the_host_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A KVM guest's saved registers use the host CPU's features: a template made on another
    # CPU (a cache copied with a machine image, a microcode update) gets another key. TCG
    # emulates the same CPU anywhere: its key does not follow the host's CPU.
    parts = [tmp_path / n for n in ("qemu", "vmlinux", "initramfs")]
    for p in parts:
        p.write_bytes(b"x")
    qemu, kernel, initramfs = (str(parts[0]), parts[1], parts[2])
    here = warm.kvm_host_identity()
    assert '"flags"' in here[0]  # this host's CPU is read
    keys: dict[tuple[str, str], str] = {}
    for cpu in ("model 85 flags a b", "model 85 flags a b avx512f"):
        monkeypatch.setattr(warm, "kvm_host_identity", lambda cpu=cpu: [cpu, "6.1", "Y", ""])
        for accel in ("kvm", "tcg"):
            keys[cpu, accel] = warm.template_key(qemu, kernel, initramfs, accel, 1, 256)
    assert keys["model 85 flags a b", "kvm"] != keys["model 85 flags a b avx512f", "kvm"]
    assert keys["model 85 flags a b", "tcg"] == keys["model 85 flags a b avx512f", "tcg"]
