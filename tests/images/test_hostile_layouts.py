"""Crafted local OCI layouts (oci-layout:) get a clear error, never a wrong or leaked image."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ocibuild as ob
import pytest
from imghelpers import assert_store_intact, ext4_cat

from isorun.images import ImageCorruptError, ImageStore, UnsupportedImageError, ext4, unpack
from isorun.images.config import StoreConfig
from isorun.images.errors import UnsafeLayerError
from isorun.images.layout import Layout
from isorun.images.skopeo import Skopeo


def _two_images(tmp: Path, variant_a: str | None) -> tuple[ob.Layout, dict[str, Any], str]:
    """A layout whose index lists images A and B for linux/amd64 (A with `variant_a`)."""
    lay = ob.Layout(tmp / "plat")
    a = lay.manifest([[ob.file("which", "A")]])
    b = lay.manifest([[ob.file("which", "B")]])
    if variant_a is not None:
        a = dict(a, platform={"os": "linux", "architecture": "amd64", "variant": variant_a})
    lay.tag(lay.image_index([a, b]), "v1")
    return lay, a, str(b["digest"])


async def test_index_variant_picks_what_skopeo_copies(store: ImageStore, tmp_path: Path) -> None:
    # skopeo copies the variant-less entry: the image must be stored under *its* digest,
    # not under A's (a later pull of the real A would get B's files).
    lay, a, b = _two_images(tmp_path, "v9")
    img = await store.ensure(f"oci-layout:{lay.path}:v1")
    assert img.digest == b != a["digest"]
    assert ext4_cat(img.rootfs, "/which") == "B"


async def test_ambiguous_index_is_refused(store: ImageStore, tmp_path: Path) -> None:
    lay, _, _ = _two_images(tmp_path, None)
    with pytest.raises(UnsupportedImageError, match=r"2 manifests for linux/amd64.*ambiguous"):
        await store.ensure(f"oci-layout:{lay.path}:v1")
    assert store.list() == []
    assert_store_intact(store)


async def test_copy_of_another_image_is_refused(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever the reason the resolved and the copied manifest differ, nothing is stored.
    lay, a, b = _two_images(tmp_path, "v9")
    monkeypatch.setattr(Skopeo, "_pick_platform", lambda self, index, what: a["digest"])
    with pytest.raises(ImageCorruptError, match=f"resolved to manifest {a['digest']}.*{b}"):
        await store.ensure(f"oci-layout:{lay.path}:v1")
    assert store.list() == []
    assert_store_intact(store)


def _deep_layout(tmp: Path, depth: int) -> Path:
    lay = ob.Layout(tmp / f"deep{depth}")
    lay.tag(lay.manifest([[ob.dir_("a/" * i) for i in range(1, depth + 1)]]), "v1")
    return lay.path


async def test_too_deep_tree_is_refused_and_leaves_nothing(
    store: ImageStore, tmp_path: Path
) -> None:
    # mkfs.ext4 -d crashes near 1020 levels; umoci is slow on deep trees, so 600 here.
    with pytest.raises(UnsupportedImageError, match="more than 512 directories deep"):
        await store.ensure(f"oci-layout:{_deep_layout(tmp_path, 600)}:v1")
    assert list((store.root / "tmp").iterdir()) == []
    assert (await store.gc()).removed == []
    assert store.disk_usage().tmp_bytes == 0
    assert_store_intact(store)


async def test_gc_removes_a_deep_leftover_work_dir(store: ImageStore, tmp_path: Path) -> None:
    # A crashed pull left a tree deeper than Python's recursion limit (os.walk and
    # shutil.rmtree recurse per level): gc and disk_usage still work, and remove it.
    left = store.root / "tmp" / ("build-" + "0" * 64 + "-x")
    deep = left / ("a/" * 1100)
    subprocess.run(["mkdir", "-p", str(deep)], check=True)  # Path.mkdir recurses per level
    (deep / "f").write_bytes(b"x" * 10000)
    assert store.disk_usage().tmp_bytes > 1100 * 4096
    report = await store.gc()
    assert report.freed_bytes > 1100 * 4096
    assert not left.exists()
    assert store.disk_usage().tmp_bytes == 0


async def test_deep_but_allowed_tree_converts(store: ImageStore, tmp_path: Path) -> None:
    img = await store.ensure(f"oci-layout:{_deep_layout(tmp_path, 500)}:v1")
    assert img.digest.startswith("sha256:")


async def test_zstd_blob_listed_twice_converts(store: ImageStore, tmp_path: Path) -> None:
    lay = ob.Layout(tmp_path / "dupzstd")
    same = [ob.file("a.txt", "hello")]
    lay.tag(lay.manifest([same, [ob.file("b.txt", "x")], same], compression="zstd"), "v1")
    img = await store.ensure(f"oci-layout:{lay.path}:v1")
    assert ext4_cat(img.rootfs, "/a.txt") == "hello" and ext4_cat(img.rootfs, "/b.txt") == "x"
    assert len(img.layers) == 3 and img.layers[0] == img.layers[2]


@pytest.mark.parametrize("target", ["copy", "/dev/zero"])
async def test_platform_manifest_symlink_is_refused(
    store: ImageStore, tmp_path: Path, target: str
) -> None:
    # The layout is the caller's: its blobs must not lead us to read other host files
    # (a symlink to /dev/zero used to be read until memory ran out).
    lay = ob.Layout(tmp_path / "lay")
    a = lay.manifest([[ob.file("x", "y")]])
    lay.tag(lay.image_index([a]), "v1")
    blob = lay.path / "blobs" / "sha256" / a["digest"].split(":")[1]
    if target == "copy":
        target = str(tmp_path / "elsewhere")
        blob.rename(target)
    else:
        blob.unlink()
    blob.symlink_to(target)
    with pytest.raises(ImageCorruptError, match=f"{a['digest']} is not a regular file"):
        await store.ensure(f"oci-layout:{lay.path}:v1")
    assert store.list() == []


MT_INDEX = "application/vnd.oci.image.index.v1+json"
ZERO = "sha256:" + "0" * 64


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": ["x"]}, "entry 0 is not"),
        (
            {
                "mediaType": MT_INDEX,
                "manifests": [{"digest": "sha256:" + "0" * 64, "platform": []}],
            },
            "entry 0 is not a descriptor with a platform object",
        ),
        ({"schemaVersion": 2, "manifests": "abc"}, "'manifests' is not a list"),
    ],
)
async def test_malformed_index_is_a_clear_error(
    store: ImageStore, tmp_path: Path, doc: dict[str, Any], needle: str
) -> None:
    lay = ob.Layout(tmp_path / "lay")
    raw = json.dumps(doc).encode()
    lay.tag({"mediaType": MT_INDEX, "digest": lay.blob(raw), "size": len(raw)}, "v1")
    with pytest.raises(ImageCorruptError, match=needle):
        await store.ensure(f"oci-layout:{lay.path}:v1")
    assert store.list() == []


@pytest.mark.parametrize(
    ("manifests", "needle"),
    [
        (["x"], r"manifests\[0\] is not a descriptor"),
        ([{"annotations": ["img"]}], r"manifests\[0\] is not a descriptor"),
        ("img", "'manifests' is not a list"),
    ],
)
def test_malformed_pulled_index_is_a_clear_error(
    tmp_path: Path, manifests: object, needle: str
) -> None:
    (tmp_path / "index.json").write_text(json.dumps({"manifests": manifests}))
    with pytest.raises(ImageCorruptError, match=needle):
        Layout(tmp_path).read()


async def test_files_with_large_extended_attributes_convert(
    store: ImageStore, tmp_path: Path
) -> None:
    # Each file's 300-byte attribute (a signature, say) does not fit in its inode and takes a
    # block: the size estimate ignored them, and mkfs ran out of blocks for this valid image.
    files = 12_000
    lay = ob.Layout(tmp_path / "signed")
    sig = "S" * 300
    entries = [ob.dir_("d")] + [
        ob.file(f"d/f{i:05d}", xattrs={"user.sig": f"{i:05d}{sig}"}) for i in range(files)
    ]
    lay.tag(lay.manifest([entries]), "v1")
    img = await store.ensure(f"oci-layout:{lay.path}:v1")
    got = subprocess.run(
        ["debugfs", "-R", "ea_get /d/f11999 user.sig", str(img.rootfs)],
        capture_output=True,
        text=True,
    )
    assert f"11999{sig}" in got.stdout, got.stdout + got.stderr


async def test_a_whiteout_of_dot_dot_reaches_nothing_outside_the_tree(tmp_path: Path) -> None:
    # umoci takes `.wh..` (a whiteout of "..") at a layer's top for the target's parent, and
    # deleted it: the directory the tree was unpacked into, and all beside it.
    lay = ob.Layout(tmp_path / "dotdot")
    lay.tag(lay.manifest([[ob.file("top", "t")], [ob.whiteout("..")]]), "v1")
    work = tmp_path / "work"
    work.mkdir()
    (work / "beside").write_text("kept")
    with pytest.raises(UnsafeLayerError, match="removed the directory"):
        await unpack.unpack(
            lay.path, "v1", work / "rootfs", timeout=60, max_bytes=1 << 30, max_files=1000
        )
    assert (work / "beside").read_text() == "kept"


async def test_an_extended_attribute_the_host_cannot_hold_is_not_called_a_full_disk(
    store: ImageStore, tmp_path: Path
) -> None:
    # ext4 holds an attribute in one block: an 8,000-byte one fails ENOSPC, which said
    # "disk full: free space and retry", where no space freed would help.
    lay = ob.Layout(tmp_path / "bigxattr")
    lay.tag(lay.manifest([[ob.file("f", "x", xattrs={"user.big": "v" * 8000})]]), "v1")
    with pytest.raises(UnsupportedImageError, match="extended attributes larger"):
        await store.ensure(f"oci-layout:{lay.path}:v1")
    assert_store_intact(store)


def test_a_tree_mkfs_would_take_too_long_on_is_refused_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mkfs.ext4 -d's time grows as the square of a directory's entries: a few hundred KB of
    # layer holding one flat directory of empty files tied up a host core until the pull's
    # timeout (40,000 entries: 127 s; 200,000: past 30 min). Spread over directories, the
    # same number costs next to nothing and is taken. (The bound scaled down 400x here.)
    monkeypatch.setattr(ext4, "MAX_DIR_WORK", 100**2)
    flat = tmp_path / "flat" / "d"
    flat.mkdir(parents=True)
    for i in range(101):
        (flat / f"f{i}").touch()
    with pytest.raises(UnsupportedImageError, match="d with 101"):
        ext4.measure(tmp_path / "flat")
    spread = tmp_path / "spread"
    for j in range(30):
        (spread / f"d{j}").mkdir(parents=True)
        for i in range(15):
            (spread / f"d{j}" / f"f{i}").touch()
    assert ext4.measure(spread).inodes == 481


async def test_conversions_beyond_the_store_s_slots_wait_saying_so(tmp_path: Path) -> None:
    # Every pull of a different image converted at once (skopeo, umoci, mkfs.ext4 each),
    # however many: nothing bounded the host's cores and disk. Here one slot: the second
    # image waits, says why, and converts once the first is done.
    store = ImageStore(tmp_path / "store", StoreConfig(auth_file=None, max_conversions=1))
    seen: dict[str, list[tuple[float, str, str]]] = {}
    refs = []
    for name in ("one", "two"):
        lay = ob.Layout(tmp_path / name)
        lay.tag(lay.manifest([ob.busybox_tree([ob.file("etc/marker", name)])]), "v1")
        refs.append(f"oci-layout:{lay.path}:v1")

    async def pull(ref: str) -> None:
        log = seen.setdefault(ref, [])
        await store.ensure(
            ref, progress=lambda ev: log.append((time.monotonic(), ev.phase, ev.message))
        )

    # The first conversion keeps its slot until the second has asked for one: else, on a
    # fast host, the first could be done before the second got there (nothing to wait for).
    asked: list[str] = []
    both_asked = asyncio.Event()
    real_slot = store._conversion_slot

    @contextlib.asynccontextmanager
    async def slot(name: str, digest: str, emit: Any) -> AsyncIterator[None]:
        asked.append(name)
        if len(asked) == len(refs):
            both_asked.set()
        async with real_slot(name, digest, emit):
            await asyncio.wait_for(both_asked.wait(), 60)
            yield

    store._conversion_slot = slot  # type: ignore[method-assign]
    await asyncio.gather(*(pull(r) for r in refs))
    converting = {"unpacking", "converting"}  # what a conversion says in its slot
    spans = sorted(
        (min(t for t, p, _ in log if p in converting), max(t for t, p, _ in log if p in converting))
        for log in seen.values()
    )
    assert spans[0][1] <= spans[1][0], spans  # one after the other
    waited = [m for log in seen.values() for _, phase, m in log if phase == "waiting"]
    assert waited == ["1 other image conversions are running"], seen
    assert {ext4_cat(store.inspect(r).rootfs, "/etc/marker") for r in refs} == {"one", "two"}
