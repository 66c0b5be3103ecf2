"""Offline import (OCI layout, docker save tarball) and image management."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ocibuild as ob
import pytest
from imghelpers import Registry, assert_store_intact, ext4_cat

from isorun.images import ImageError, ImageInUseError, ImageNotFoundError, ImageStore
from isorun.images.locks import try_lock_dir
from isorun.images.progress import ProgressEvent
from isorun.images.store import STAGING_GRACE_S


def _layout(tmp: Path, name: str, marker: str) -> Path:
    lay = ob.Layout(tmp / name)
    lay.tag(
        lay.manifest(
            [ob.busybox_tree([ob.file("MARK", marker)])],
            config={"Env": ["X=1"], "WorkingDir": "/tmp"},
        ),
        "t",
    )
    return lay.path


async def test_import_oci_layout(store: ImageStore, tmp_path: Path) -> None:
    lay = _layout(tmp_path, "lay", "oci")
    img = await store.ensure(f"oci-layout:{lay}:t")
    assert ext4_cat(img.rootfs, "/MARK") == "oci"
    assert img.config.env["X"] == "1" and img.config.working_dir == "/tmp"
    assert img.digest == ob.Layout(lay).index["manifests"][0]["digest"]
    again = await store.ensure(f"oci-layout:{lay}:t")
    assert again.digest == img.digest and store.stats.conversions == 1


async def test_stored_images_are_not_readable_by_other_local_users(
    store: ImageStore, tmp_path: Path
) -> None:
    # A private image (and the secrets its Env may hold) was 0444 under 0755 directories.
    img = await store.ensure(f"oci-layout:{_layout(tmp_path, 'lay', 'private')}:t")
    for sub in ("images", "tmp"):
        assert (store.root / sub).stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:
        other = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(img.rootfs)],
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0 and "Permission denied" in other.stderr


async def test_import_docker_archive(store: ImageStore, tmp_path: Path) -> None:
    lay = _layout(tmp_path, "lay", "docker-save")
    tar = tmp_path / "saved.tar"
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{lay}:t", f"docker-archive:{tar}:acme/app:1"],
        check=True,
        capture_output=True,
    )
    img = await store.ensure(f"docker-archive:{tar}")
    assert ext4_cat(img.rootfs, "/MARK") == "docker-save"
    assert img.config.env["X"] == "1"
    again = await store.ensure(f"docker-archive:{tar}")
    assert again.digest == img.digest and store.stats.conversions == 1


async def test_list_inspect_remove_gc_usage(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    registry.push(f"oci:{_layout(tmp_path, 'a', 'a')}:t", "mgmt-a:1")
    a = await store.ensure(f"{registry.host}/mgmt-a:1")
    b = await store.ensure(f"oci-layout:{_layout(tmp_path, 'b', 'b')}:t")
    assert {i.digest for i in store.list()} == {a.digest, b.digest}
    assert store.inspect(a.digest).rootfs == a.rootfs
    assert store.inspect(f"{registry.host}/mgmt-a:1").digest == a.digest
    usage = store.disk_usage()
    assert usage.images == 2 and usage.image_bytes == a.disk_bytes + b.disk_bytes
    assert usage.tmp_bytes == 0
    assert a.disk_bytes < a.size_bytes  # sparse file: only written blocks count

    await store.acquire(a.digest, "sandbox-1")
    await store.acquire(a.digest, "snapshot:s1")
    with pytest.raises(ImageInUseError, match="sandbox-1") as exc:
        await store.remove(f"{registry.host}/mgmt-a:1")
    assert exc.value.holders == ["sandbox-1", "snapshot:s1"]
    assert store.inspect(a.digest).rootfs.is_file()
    assert (await store.gc(all_unused=True)).removed == [b.digest]
    assert await store.release(a.digest, "sandbox-1")
    assert not await store.release(a.digest, "sandbox-1")
    with pytest.raises(ImageInUseError):
        await store.remove(a.digest)
    await store.release(a.digest, "snapshot:s1")
    # Named images survive a plain gc; an unnamed one (names dropped) does not.
    assert (await store.gc()).removed == []
    removed = await store.remove(f"{registry.host}/mgmt-a:1")
    assert removed.digest == a.digest and store.list() == []
    with pytest.raises(ImageNotFoundError):
        store.inspect(a.digest)
    with pytest.raises(ImageNotFoundError):
        await store.acquire(a.digest, "sandbox-2")
    assert_store_intact(store)


async def test_gc_leaves_no_lock_files_of_images_not_stored(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    # every pull left locks/<hex>.lock for good: failed ones and removed images too
    broken = ob.Layout(tmp_path / "broken")
    desc = broken.manifest([[ob.file("f", "broken")]])
    broken.tag(desc, "t")
    registry.push(f"oci:{broken.path}:t", "locks-broken:1")
    manifest = json.loads((broken.path / "blobs/sha256" / desc["digest"][7:]).read_bytes())
    for layer in manifest["layers"]:
        registry.blob_path(layer["digest"]).unlink()  # its conversion fails
    with pytest.raises(ImageError):
        await store.ensure(f"{registry.host}/locks-broken:1")
    registry.push(f"oci:{_layout(tmp_path, 'gone', 'gone')}:t", "locks-gone:1")
    gone = await store.ensure(f"{registry.host}/locks-gone:1")
    await store.acquire(gone.digest, "sb-1")
    await store.release(gone.digest, "sb-1")
    await store.remove(gone.digest)
    kept = await store.ensure(f"oci-layout:{_layout(tmp_path, 'kept', 'kept')}:t")
    await store.acquire(kept.digest, "sb-2")
    assert len(list((store.root / "locks").iterdir())) == 3
    await store.gc()
    assert [p.name for p in (store.root / "locks").iterdir()] == [f"{kept.digest[7:]}.lock"]
    # and a lock file pruned is made anew by whoever needs it
    again = await store.ensure(f"{registry.host}/locks-gone:1")
    assert again.digest == gone.digest and store.holders(kept.digest) == ["sb-2"]
    assert_store_intact(store)


async def test_gc_cleans_crashed_builds(store: ImageStore) -> None:
    crashed = store.root / "tmp" / f"build-{'a' * 64}-xyz"
    (crashed / "rootfs").mkdir(parents=True)
    (crashed / "rootfs" / "junk").write_bytes(b"x" * 10000)
    report = await store.gc()
    assert not crashed.exists() and report.freed_bytes >= 10000


async def test_gc_removes_work_dirs_of_crashed_pulls_only(store: ImageStore) -> None:
    # A pull killed mid-resolve (kill -9: no cleanup runs) leaves its work dir, which may
    # hold the registry credentials it handed to skopeo.
    crash = (
        "import os, sys; from pathlib import Path; from isorun.images import ImageStore\n"
        "from isorun.images.config import StoreConfig\n"
        "s = ImageStore(Path(sys.argv[1]), StoreConfig(auth_file=None))\n"
        "with s._workdir('resolve') as d:\n"
        "    (d / 'auth.json').write_text('{\"auths\": {}}')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", crash, str(store.root))
    assert await proc.wait() == -9
    left = [d for d in (store.root / "tmp").iterdir() if d.name.startswith("resolve-")]
    assert len(left) == 1 and (left[0] / "auth.json").exists()
    with store._workdir("resolve") as busy:  # a pull of this process, still running
        (busy / "auth.json").write_text("{}")
        await store.gc()
        assert not left[0].exists(), "the crashed pull's work dir was kept"
        assert (busy / "auth.json").exists(), "gc removed a running pull's work dir"


async def test_gc_spares_a_work_dir_not_yet_locked(store: ImageStore) -> None:
    """A work dir is locked an instant after it is made: a gc in that instant must leave it
    (it did remove it), and remove one a crash left in that state long ago."""
    tmp = store.root / "tmp"
    starting = Path(tempfile.mkdtemp(prefix="new-resolve-", dir=tmp))
    crashed = Path(tempfile.mkdtemp(prefix="new-resolve-", dir=tmp))
    long_ago = time.time() - 2 * STAGING_GRACE_S
    os.utime(crashed, (long_ago, long_ago))
    await store.gc()
    assert starting.is_dir(), "gc removed a work dir about to be locked"
    assert not crashed.exists(), "gc kept a work dir a crash left unlocked"
    with store._workdir("resolve") as d:
        assert d.parent == tmp and d.name.startswith("resolve-") and d.is_dir()
        assert try_lock_dir(d) is None, "a work dir in use is not locked"
    assert not d.exists()


async def test_ensure_for_a_holder_survives_a_gc_in_another_process(
    store: ImageStore, tmp_path: Path
) -> None:
    # A sandbox create finds its image in the store; before it holds it, `gc --all` runs
    # in another process and deletes the (unheld) image. The create must still get it.
    lay = _layout(tmp_path, "lay", "held")
    ref = f"oci-layout:{lay}:t"
    await store.ensure(ref)
    gc_elsewhere = (
        "import asyncio, sys; from pathlib import Path; from isorun.images import ImageStore\n"
        "from isorun.images.config import StoreConfig\n"
        "s = ImageStore(Path(sys.argv[1]), StoreConfig(auth_file=None))\n"
        "print(len(asyncio.run(s.gc(all_unused=True)).removed))\n"
    )
    removed: list[str] = []

    def on_progress(ev: ProgressEvent) -> None:
        if ev.phase == "cached" and not removed:
            run = subprocess.run(
                [sys.executable, "-c", gc_elsewhere, str(store.root)],
                capture_output=True,
                text=True,
                check=True,
            )
            removed.append(run.stdout.strip())

    img = await store.ensure(ref, progress=on_progress, holder="sb-1")
    assert removed == ["1"], "the gc did not run in the gap"
    assert ext4_cat(img.rootfs, "/MARK") == "held"
    assert store.holders(img.digest) == ["sb-1"]
    assert (await store.gc(all_unused=True)).removed == []  # held: gc keeps it now
