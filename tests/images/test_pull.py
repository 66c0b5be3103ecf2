"""Pull from a real loopback registry: tags, digests, schema2/OCI, multi-arch, zstd, layers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import ocibuild as ob
from imghelpers import (
    Registry,
    _start_registry,
    assert_store_intact,
    ext4_cat,
    ext4_ls,
    ext4_stat,
)

from isorun.images import ImageStore, StoreConfig, UnsupportedImageError

CONFIG = {
    "Env": ["PATH=/bin:/usr/bin", "GREETING=hello world", "EMPTY="],
    "WorkingDir": "/srv/app",
    "User": "1000:1000",
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo hi"],
}


def busybox_layout(tmp: Path, tag: str = "v1", compression: ob.Compression = "gzip") -> Path:
    lay = ob.Layout(tmp / f"bb-{compression}")
    desc = lay.manifest(
        [ob.busybox_tree([ob.dir_("srv"), ob.dir_("srv/app")])],
        config=CONFIG,
        compression=compression,
    )
    lay.tag(desc, tag)
    return lay.path


async def test_pull_by_tag_and_digest(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    digest = registry.push(f"oci:{busybox_layout(tmp_path)}:v1", "busybox:v1")
    img = await store.ensure(f"{registry.host}/busybox:v1")
    assert img.digest == digest
    assert img.rootfs.is_file() and img.rootfs.stat().st_mode & 0o222 == 0
    assert "ID=isorun-busybox" in ext4_cat(img.rootfs, "/etc/os-release")
    st = ext4_stat(img.rootfs, "/bin/busybox")
    assert st is not None and st.mode & 0o777 == 0o755
    assert img.config.env == {"PATH": "/bin:/usr/bin", "GREETING": "hello world", "EMPTY": ""}
    assert img.config.working_dir == "/srv/app"
    assert img.config.user == "1000:1000"
    assert img.config.entrypoint == ["/bin/sh", "-c"]
    assert img.config.cmd == ["echo hi"]
    assert img.size_bytes >= img.content_bytes
    by_digest = await store.ensure(f"{registry.host}/busybox@{digest}")
    assert by_digest.rootfs == img.rootfs and store.stats.conversions == 1
    assert f"{registry.host}/busybox:v1" in store.inspect(f"{registry.host}/busybox:v1").names
    assert_store_intact(store)


async def test_schema2_push_and_short_name_defaults(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    digest = registry.push(f"oci:{busybox_layout(tmp_path)}:v1", "lib/bb-s2:1", fmt="v2s2")
    img = await store.ensure(f"{registry.host}/lib/bb-s2:1")
    assert img.digest == digest
    assert img.config.working_dir == "/srv/app"


async def test_layers_whiteouts_links_devices_xattrs(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    lay = ob.Layout(tmp_path / "multi")
    l1 = ob.busybox_tree(
        [
            ob.dir_("data"),
            ob.file("data/keep", "keep"),
            ob.file("data/gone", "gone"),
            ob.dir_("opq"),
            ob.file("opq/old1", "1"),
            ob.file("opq/old2", "2"),
            ob.file("data/orig", "linked"),
            ob.hardlink("data/hl", "data/orig"),
        ]
    )
    l2 = [
        ob.whiteout("data/gone"),
        ob.opaque("opq"),
        ob.file("opq/new", "new"),
        ob.Entry("dev/mynull", kind="chardev", devmajor=1, devminor=3, mode=0o666),
        ob.Entry("dev/myblk", kind="blockdev", devmajor=7, devminor=0, mode=0o660),
        ob.Entry("dev/fifo", kind="fifo", mode=0o600),
        ob.file("owned", "o", uid=1234, gid=99, mode=0o4750),
        ob.file("xattr", "x", xattrs={"user.isorun": "yes", "trusted.t": "v"}),
        ob.symlink("abs-link", "/etc/os-release"),
    ]
    lay.tag(lay.manifest([l1, l2]), "t")
    registry.push(f"oci:{lay.path}:t", "multi:t")
    img = await store.ensure(f"{registry.host}/multi:t")
    r = img.rootfs
    assert ext4_ls(r, "/data") == ["hl", "keep", "orig"]
    assert ext4_ls(r, "/opq") == ["new"]
    orig, hl = ext4_stat(r, "/data/orig"), ext4_stat(r, "/data/hl")
    assert orig and hl and orig.inode == hl.inode and orig.links == 2
    cdev = ext4_stat(r, "/dev/mynull")
    assert cdev and cdev.kind == "character special"
    assert "Device major/minor number: 01:03" in cdev.raw
    bdev = ext4_stat(r, "/dev/myblk")
    assert bdev and bdev.kind == "block special"
    fifo = ext4_stat(r, "/dev/fifo")
    assert fifo and fifo.kind == "FIFO"
    owned = ext4_stat(r, "/owned")
    assert owned and (owned.uid, owned.gid, owned.mode & 0o7777) == (1234, 99, 0o4750)
    xa = ext4_stat(r, "/xattr")
    assert xa and 'user.isorun (3) = "yes"' in xa.raw and "trusted.t" in xa.raw
    link = ext4_stat(r, "/abs-link")
    assert link and link.kind == "symlink" and "/etc/os-release" in link.raw


async def test_multi_arch_index_picks_linux_amd64(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    lay = ob.Layout(tmp_path / "multiarch")
    amd = lay.manifest([ob.busybox_tree([ob.file("ARCH", "amd64")])], arch="amd64")
    arm = lay.manifest([ob.busybox_tree([ob.file("ARCH", "arm64")])], arch="arm64")
    lay.tag(lay.image_index([arm, amd]), "multi")
    index_digest = registry.push(f"oci:{lay.path}:multi", "multiarch:1", all_=True)
    img = await store.ensure(f"{registry.host}/multiarch:1")
    assert ext4_cat(img.rootfs, "/ARCH") == "amd64"
    assert img.digest == amd["digest"] and index_digest != img.digest
    again = await store.ensure(f"{registry.host}/multiarch@{index_digest}")
    assert again.digest == img.digest and store.stats.conversions == 1


async def test_index_without_our_platform_is_refused(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    lay = ob.Layout(tmp_path / "armonly")
    arm = lay.manifest([ob.busybox_tree()], arch="arm64")
    lay.tag(lay.image_index([arm]), "arm")
    registry.push(f"oci:{lay.path}:arm", "armonly:1", all_=True)
    try:
        await store.ensure(f"{registry.host}/armonly:1")
    except UnsupportedImageError as exc:
        assert "linux/amd64" in str(exc) and "linux/arm64" in str(exc)
    else:
        raise AssertionError("expected UnsupportedImageError")
    assert_store_intact(store)


async def test_zstd_layers(store: ImageStore, registry: Registry, tmp_path: Path) -> None:
    digest = registry.push(f"oci:{busybox_layout(tmp_path, compression='zstd')}:v1", "zstd:1")
    img = await store.ensure(f"{registry.host}/zstd:1")
    assert img.digest == digest
    assert "ID=isorun-busybox" in ext4_cat(img.rootfs, "/etc/os-release")


async def test_uncompressed_layers(store: ImageStore, registry: Registry, tmp_path: Path) -> None:
    registry.push(f"oci:{busybox_layout(tmp_path, compression='none')}:v1", "plain:1")
    img = await store.ensure(f"{registry.host}/plain:1")
    assert "ID=isorun-busybox" in ext4_cat(img.rootfs, "/etc/os-release")


async def test_concurrent_ensure_converts_once(registry: Registry, tmp_path: Path) -> None:
    registry.push(f"oci:{busybox_layout(tmp_path)}:v1", "conc:1")
    root = tmp_path / "store"
    a = ImageStore(root, StoreConfig(auth_file=None))
    b = ImageStore(root, StoreConfig(auth_file=None))  # a second "process" on the same root
    ref = f"{registry.host}/conc:1"
    imgs = await asyncio.gather(a.ensure(ref), a.ensure(ref), b.ensure(ref), b.ensure(ref))
    assert len({i.rootfs for i in imgs}) == 1
    assert a.stats.conversions + b.stats.conversions == 1
    assert_store_intact(a)


async def test_cached_tag_needs_no_registry(tmp_path: Path) -> None:
    # A registry of its own, stopped after the first pull: the second ensure of the tag
    # must be served from the store without asking it.
    reg = _start_registry(tmp_path / "reg", None)
    try:
        reg.push(f"oci:{busybox_layout(tmp_path)}:v1", "offline:1")
        store = ImageStore(tmp_path / "store", StoreConfig(auth_file=None))
        first = await store.ensure(f"{reg.host}/offline:1")
    finally:
        reg.proc.terminate()
        reg.proc.wait(10)
    refs = (tmp_path / "store" / "refs.json").read_text()
    assert first.digest in refs
    again = await store.ensure(f"{reg.host}/offline:1")
    assert again.digest == first.digest and store.stats.cache_hits >= 1
    assert store.stats.conversions == 1


async def test_cached_index_digest_needs_no_registry(tmp_path: Path) -> None:
    # Pinning a multi-arch image by its manifest-list digest (the digest `docker pull`
    # prints) is the common way to pin; once pulled it must not need the registry, and
    # inspect/remove must find it by that reference.
    reg = _start_registry(tmp_path / "reg", None)
    lay = ob.Layout(tmp_path / "multiarch")
    amd = lay.manifest([ob.busybox_tree([ob.file("ARCH", "amd64")])], arch="amd64")
    arm = lay.manifest([ob.busybox_tree([ob.file("ARCH", "arm64")])], arch="arm64")
    lay.tag(lay.image_index([arm, amd]), "multi")
    try:
        index_digest = reg.push(f"oci:{lay.path}:multi", "pinned:1", all_=True)
        store = ImageStore(tmp_path / "store", StoreConfig(auth_file=None))
        ref = f"{reg.host}/pinned@{index_digest}"
        first = await store.ensure(ref)
    finally:
        reg.proc.terminate()
        reg.proc.wait(10)
    assert first.digest == amd["digest"] != index_digest
    again = await store.ensure(ref)
    assert again.digest == first.digest and store.stats.conversions == 1
    assert store.inspect(ref).digest == first.digest
    assert (await store.remove(ref)).digest == first.digest and store.list() == []
