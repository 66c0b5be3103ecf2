"""Every bad input gets a clear error naming the problem, and the cache stays intact."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ocibuild as ob
import pytest
from imghelpers import Registry, assert_store_intact, ext4_cat, ext4_ls, free_port

from isorun.images import (
    Credentials,
    ImageCorruptError,
    ImageError,
    ImageNotFoundError,
    ImageStore,
    ImageTooLargeError,
    RegistryAuthError,
    RegistryUnreachableError,
    StoreConfig,
    StoreFullError,
    UnsafeLayerError,
)

MiB = 1 << 20


def _layout(tmp: Path, name: str, layers: list[list[ob.Entry]] | list[bytes], **kw: object) -> Path:
    lay = ob.Layout(tmp / name)
    lay.tag(lay.manifest(layers, **kw), "t")  # type: ignore[arg-type]
    return lay.path


@pytest.fixture
async def seeded(store: ImageStore, registry: Registry, tmp_path: Path) -> ImageStore:
    """A store that already holds one good image, to check that failures don't harm it."""
    registry.push(f"oci:{_layout(tmp_path, 'good', [ob.busybox_tree()])}:t", "good:1")
    await store.ensure(f"{registry.host}/good:1")
    return store


def _intact(store: ImageStore, registry: Registry) -> None:
    assert_store_intact(store)
    img = store.inspect(f"{registry.host}/good:1")
    assert "isorun-busybox" in ext4_cat(img.rootfs, "/etc/os-release")
    assert len(store.list()) == 1


async def test_unknown_repository(seeded: ImageStore, registry: Registry) -> None:
    with pytest.raises(ImageNotFoundError, match="not found"):
        await seeded.ensure(f"{registry.host}/no-such-repo:1")
    _intact(seeded, registry)


async def test_unknown_tag(seeded: ImageStore, registry: Registry) -> None:
    with pytest.raises(ImageNotFoundError, match="good:nope"):
        await seeded.ensure(f"{registry.host}/good:nope")
    _intact(seeded, registry)


async def test_unknown_digest(seeded: ImageStore, registry: Registry) -> None:
    with pytest.raises(ImageNotFoundError):
        await seeded.ensure(f"{registry.host}/good@sha256:{'0' * 64}")
    _intact(seeded, registry)


async def test_registry_unreachable(seeded: ImageStore, registry: Registry) -> None:
    with pytest.raises(RegistryUnreachableError, match="cannot reach the registry"):
        await seeded.ensure(f"127.0.0.1:{free_port()}/x:1")
    _intact(seeded, registry)


async def test_a_misspelt_template_says_it_went_to_docker_hub(seeded: ImageStore) -> None:
    # No internet here: Docker Hub is unreachable, and the error still says why it was asked.
    with pytest.raises(ImageError) as caught:
        await seeded.ensure("pyhton")
    assert "'pyhton' is not a template, so it was looked up as docker.io/library/pyhton" in str(
        caught.value
    )
    assert "base, node, python" in str(caught.value)
    # a name with a tag or a registry is meant for a registry: no template hint
    with pytest.raises(ImageError) as caught:
        await seeded.ensure(f"127.0.0.1:{free_port()}/x:1")
    assert "template" not in str(caught.value)


async def test_auth_registry(
    seeded: ImageStore, registry: Registry, auth_registry: Registry, tmp_path: Path
) -> None:
    digest = auth_registry.push(
        f"oci:{_layout(tmp_path, 'priv', [ob.busybox_tree()])}:t", "private/app:1"
    )
    ref = f"{auth_registry.host}/private/app:1"
    with pytest.raises(RegistryAuthError, match="refused access"):
        await seeded.ensure(ref)
    with pytest.raises(RegistryAuthError, match="check the username"):
        await seeded.ensure(ref, credentials=Credentials("agent", "wrong-password"))
    _intact(seeded, registry)
    img = await seeded.ensure(ref, credentials=Credentials("agent", "s3cret-pw"))
    assert img.digest == digest
    # The same through a docker config.json-format auth file.
    import base64
    import json

    auth = tmp_path / "config.json"
    token = base64.b64encode(b"agent:s3cret-pw").decode()
    auth.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    other = ImageStore(tmp_path / "store2", StoreConfig(auth_file=auth))
    assert (await other.ensure(ref)).digest == digest
    assert "s3cret" not in repr(Credentials("agent", "s3cret-pw"))


async def test_blob_digest_mismatch(seeded: ImageStore, registry: Registry, tmp_path: Path) -> None:
    lay = _layout(tmp_path, "corrupt", [ob.busybox_tree([ob.file("x", os.urandom(4096))])])
    registry.push(f"oci:{lay}:t", "corrupt:1")
    man = ob.Layout(lay)
    import json

    mdesc = man.index["manifests"][0]
    manifest = json.loads((lay / "blobs/sha256" / mdesc["digest"].split(":")[1]).read_bytes())
    blob = registry.blob_path(manifest["layers"][0]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageCorruptError, match="does not match its digest"):
        await seeded.ensure(f"{registry.host}/corrupt:1")
    _intact(seeded, registry)


async def test_truncated_layer(seeded: ImageStore, registry: Registry, tmp_path: Path) -> None:
    full = gzip.compress(ob.make_tar(ob.busybox_tree()))
    lay = _layout(tmp_path, "trunc", [full[: len(full) // 2]], precompressed=True)
    registry.push(f"oci:{lay}:t", "trunc:1")
    with pytest.raises(ImageCorruptError, match="truncated or"):
        await seeded.ensure(f"{registry.host}/trunc:1")
    _intact(seeded, registry)


async def test_garbage_layer(seeded: ImageStore, registry: Registry, tmp_path: Path) -> None:
    lay = _layout(tmp_path, "garbage", [os.urandom(8192)], precompressed=True)
    registry.push(f"oci:{lay}:t", "garbage:1")
    with pytest.raises(ImageCorruptError):
        await seeded.ensure(f"{registry.host}/garbage:1")
    _intact(seeded, registry)


async def test_path_traversal_and_absolute_symlinks_stay_inside(
    seeded: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    rel = "../" * 12 + str(outside).lstrip("/")
    lay = _layout(
        tmp_path,
        "hostile",
        [
            ob.busybox_tree(
                [
                    ob.file(f"{rel}/dotdot", "x"),
                    ob.file(f"/{outside}/absolute-name", "x"),
                    ob.symlink("abs", str(outside)),
                    ob.symlink("up", rel),
                ]
            ),
            [
                ob.file("abs/via-abs-symlink", "x"),
                ob.file("up/via-rel-symlink", "x"),
                ob.file("abs/victim", "overwritten"),
                ob.whiteout("up/victim"),
            ],
        ],
    )
    img = await seeded.ensure(f"oci-layout:{lay}:t")
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "untouched"
    # The writes landed inside the image, under the path the symlinks resolve to there.
    inner = ext4_ls(img.rootfs, str(outside))
    assert {"dotdot", "absolute-name", "via-abs-symlink", "via-rel-symlink"} <= set(inner)
    assert_store_intact(seeded)


async def test_hard_link_outside_root_is_refused(
    seeded: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    lay = _layout(
        tmp_path,
        "hl",
        [ob.busybox_tree([ob.hardlink("stolen", "../" * 12 + str(secret).lstrip("/"))])],
    )
    with pytest.raises(UnsafeLayerError, match="hard link"):
        await seeded.ensure(f"oci-layout:{lay}:t")
    assert secret.read_text() == "host secret" and os.stat(secret).st_nlink == 1
    _intact(seeded, registry)


async def test_compressed_size_over_limit(registry: Registry, tmp_path: Path) -> None:
    registry.push(f"oci:{_layout(tmp_path, 'big', [ob.busybox_tree()])}:t", "big:1")
    small = ImageStore(tmp_path / "s", StoreConfig(auth_file=None, max_image_bytes=100_000))
    with pytest.raises(ImageTooLargeError, match="raise max_image_bytes"):
        await small.ensure(f"{registry.host}/big:1")
    assert small.stats.conversions == 0 and small.list() == []
    assert_store_intact(small)


async def test_unpacked_size_over_limit(registry: Registry, tmp_path: Path) -> None:
    bomb = _layout(tmp_path, "bomb", [[ob.file("zeros", bytes(20 * MiB))]])
    registry.push(f"oci:{bomb}:t", "bomb:1")
    small = ImageStore(tmp_path / "s", StoreConfig(auth_file=None, max_image_bytes=5 * MiB))
    with pytest.raises(ImageTooLargeError, match="unpacks to"):
        await small.ensure(f"{registry.host}/bomb:1")
    assert small.list() == []
    assert_store_intact(small)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tinyfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_disk_full_during_conversion(
    registry: Registry, tmp_path: Path, tiny_fs: Path
) -> None:
    registry.push(f"oci:{_layout(tmp_path, 'small', [ob.busybox_tree()])}:t", "small:1")
    big = _layout(tmp_path, "huge", [ob.busybox_tree([ob.file("noise", os.urandom(16 * MiB))])])
    registry.push(f"oci:{big}:t", "huge:1")
    store = ImageStore(tiny_fs / "store", StoreConfig(auth_file=None))
    good = await store.ensure(f"{registry.host}/small:1")
    with pytest.raises(StoreFullError, match="disk full"):
        await store.ensure(f"{registry.host}/huge:1")
    assert [i.digest for i in store.list()] == [good.digest]
    assert_store_intact(store)
    subprocess.run(["mount", "-o", "remount,size=128m", str(tiny_fs)], check=True)
    img = await store.ensure(f"{registry.host}/huge:1")
    assert ext4_ls(img.rootfs, "/") and len(store.list()) == 2
    assert_store_intact(store)


async def test_missing_offline_sources(
    seeded: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    with pytest.raises(ImageNotFoundError):
        await seeded.ensure(f"oci-layout:{tmp_path}/nope:t")
    with pytest.raises(ImageNotFoundError):
        await seeded.ensure(f"docker-archive:{tmp_path}/nope.tar")
    lay = _layout(tmp_path, "has-t", [ob.busybox_tree()])
    with pytest.raises(ImageNotFoundError):
        await seeded.ensure(f"oci-layout:{lay}:other-tag")
    _intact(seeded, registry)


@pytest.mark.parametrize("size", [-1, -(10**12), "12"])
async def test_manifest_lying_about_layer_size(
    seeded: ImageStore, registry: Registry, tmp_path: Path, size: object
) -> None:
    # skopeo reads a blob only up to its declared size, but a negative size means "unknown"
    # to it: an unbounded download that the compressed-size limit must not wave through.
    lay = ob.Layout(tmp_path / "liar")
    desc = lay.manifest([ob.busybox_tree([ob.file("noise", os.urandom(8 * MiB))])])
    manifest = json.loads((lay.path / "blobs/sha256" / desc["digest"][7:]).read_bytes())
    blobs = [
        (lay.path / "blobs/sha256" / d["digest"][7:]).read_bytes()
        for d in [manifest["config"], *manifest["layers"]]
    ]
    manifest["layers"][0]["size"] = size
    raw = json.dumps(manifest).encode()
    lay.tag({"mediaType": ob.MT_MANIFEST, "digest": lay.blob(raw), "size": len(raw)}, "t")
    limited = ImageStore(seeded.root, StoreConfig(auth_file=None, max_image_bytes=4 * MiB))
    refs = [f"oci-layout:{lay.path}:t"]
    if isinstance(size, int):  # the registry itself refuses a string size
        registry.put_raw("liar", "1", raw, blobs)
        refs.append(f"{registry.host}/liar:1")
    for ref in refs:
        with pytest.raises(ImageCorruptError, match=f"layer 0 declares size {size!r}"):
            await limited.ensure(ref)
    assert limited.stats.conversions == 0
    _intact(seeded, registry)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"Env": 5}, "Env"),
        ({"Env": ["A=1", 2]}, "Env"),
        ({"Entrypoint": "/bin/sh"}, "Entrypoint"),
        ({"Cmd": {"x": 1}}, "Cmd"),
        ({"WorkingDir": ["/"]}, "WorkingDir"),
        ({"User": 0}, "User"),
    ],
)
async def test_config_fields_of_the_wrong_type(
    seeded: ImageStore, registry: Registry, tmp_path: Path, config: dict[str, object], field: str
) -> None:
    lay = _layout(tmp_path, "badcfg", [ob.busybox_tree()], config=config)
    with pytest.raises(ImageCorruptError, match=f"image config field {field} must be"):
        await seeded.ensure(f"oci-layout:{lay}:t")
    _intact(seeded, registry)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        # ~70 KB: the agent's defaults frame (64 KiB) would fail on every sandbox boot
        ({"Env": [f"V{i}=" + "x" * 1000 for i in range(70)]}, "field Env is .* over the limit"),
        ({"Env": ["A=1\x00B=2"]}, "field Env holds a NUL"),
        ({"Env": ["=x"]}, "field Env has an entry with no name"),
        ({"User": "0:0\x00evil"}, "field User holds a NUL"),
        ({"WorkingDir": "/tmp\x00"}, "field WorkingDir holds a NUL"),
        ({"WorkingDir": "tmp/work"}, "field WorkingDir must be an absolute path"),
        ({"Cmd": ["sh", "-c\x00"]}, "field Cmd holds a NUL"),
        # sent with Env in the agent's one 64 KiB frame at every boot: stored, then every
        # sandbox of the image failed
        ({"WorkingDir": "/" + "w" * 70000}, "field WorkingDir is 70001 bytes"),
        ({"User": "u" * 1000}, "field User is 1000 bytes"),
    ],
)
async def test_config_values_a_sandbox_cannot_use(
    seeded: ImageStore, registry: Registry, tmp_path: Path, config: dict[str, object], needle: str
) -> None:
    # refused when pulled, not with a 500 from every sandbox after it boots
    lay = _layout(tmp_path, "badcfg", [ob.busybox_tree()], config=config)
    with pytest.raises(ImageCorruptError, match=f"image config {needle}"):
        await seeded.ensure(f"oci-layout:{lay}:t")
    _intact(seeded, registry)


def _sparse_tar(tmp: Path, files: dict[str, int]) -> bytes:
    """A tar of sparse files (name -> apparent size): a few KB, whatever the sizes."""
    src = tmp / "sparse-src"
    src.mkdir()
    for name, size in files.items():
        with (src / name).open("wb") as f:
            f.truncate(size)
    out = subprocess.run(
        ["tar", "--sparse", "--format=posix", "-C", str(src), "-cf", "-", *files],
        check=True,
        capture_output=True,
    )
    return out.stdout


def _used_bytes(st: os.statvfs_result) -> int:
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _used_inodes(st: os.statvfs_result) -> int:
    return st.f_files - st.f_ffree


@contextlib.contextmanager
def _sampled_tmpfs(
    mnt: Path, options: str, used: Callable[[os.statvfs_result], int]
) -> Iterator[tuple[Path, list[int]]]:
    """A tmpfs at `mnt` whose peak `used` (sampled every ms) is in the list once the block
    ends; unmounted then."""
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], check=True)
    peaks = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peaks[0] = max(peaks[0], used(os.statvfs(mnt)))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield mnt, peaks
    finally:
        stop.set()
        sampler.join()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("bomb", ["one-sparse-file", "many-sparse-files", "zstd-zeros"])
async def test_decompression_bombs_do_not_fill_the_disk(
    registry: Registry, tmp_path: Path, bomb: str
) -> None:
    # umoci writes sparse tar entries densely and nothing bounds a zstd layer's output, so a
    # layer of a few KB could fill the host disk. Now the writes stop near the store limit.
    limit = 16 * MiB
    if bomb == "one-sparse-file":
        layers, comp = [_sparse_tar(tmp_path, {"huge": 1 << 40})], "gzip"
    elif bomb == "many-sparse-files":  # each under the limit, 1 GiB together
        layers, comp = [_sparse_tar(tmp_path, {f"f{i}": 8 * MiB for i in range(128)})], "gzip"
    else:
        layers, comp = [ob.make_tar([ob.file("zeros", bytes(1 << 30))])], "zstd"
    lay = _layout(tmp_path, "bomb", [ob.make_tar(ob.busybox_tree()), *layers], compression=comp)
    assert sum(p.stat().st_size for p in (lay / "blobs/sha256").iterdir()) < 2 * MiB
    good = _layout(tmp_path, "good", [ob.busybox_tree()])
    with _sampled_tmpfs(tmp_path / "fs", "size=512m", _used_bytes) as (mnt, peaks):
        store = ImageStore(mnt / "store", StoreConfig(auth_file=None, max_image_bytes=limit))
        kept = await store.ensure(f"oci-layout:{good}:t")
        with pytest.raises(ImageTooLargeError, match="store limit"):
            await store.ensure(f"oci-layout:{lay}:t")
        assert [i.digest for i in store.list()] == [kept.digest]
        assert_store_intact(store)
    peak = peaks[0]
    assert peak < 256 * MiB, f"the unpack used {peak >> 20} MiB of a 512 MiB disk"


@pytest.mark.parametrize("files", [1_000, 100_000])
async def test_an_image_of_many_empty_files_is_refused(
    registry: Registry, tmp_path: Path, files: int
) -> None:
    # Empty files weigh nothing against max_image_bytes, and a layer of 100,000 of them is
    # ~200 KB gzipped: without a limit on files such images use up the host's inodes.
    # Small trees are refused when measured after the unpack; big ones while umoci writes.
    limit = 500
    empties = ob.make_tar([ob.dir_("many"), *(ob.file(f"many/{i}") for i in range(files))])
    lay = _layout(tmp_path, "many", [ob.make_tar(ob.busybox_tree()), empties])
    good = _layout(tmp_path, "good", [ob.busybox_tree()])
    with _sampled_tmpfs(tmp_path / "fs", "size=256m,nr_inodes=400k", _used_inodes) as (mnt, peaks):
        store = ImageStore(mnt / "store", StoreConfig(auth_file=None, max_image_files=limit))
        kept = await store.ensure(f"oci-layout:{good}:t")
        with pytest.raises(ImageTooLargeError, match="files and directories, over the store"):
            await store.ensure(f"oci-layout:{lay}:t")
        assert [i.digest for i in store.list()] == [kept.digest]
        assert_store_intact(store)
    peak = peaks[0]
    assert peak < 30_000, f"the unpack made {peak} inodes of the {files} in the layer"


async def test_archive_that_is_not_a_docker_save(
    seeded: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    # A rootfs tarball (the common mistake), an empty file, a gzipped tar, random bytes:
    # the file exists, so "not found, check that the file exists" would send users astray.
    plain = ob.make_tar(ob.busybox_tree())
    cases = {
        "rootfs.tar": plain,
        "empty.tar": b"",
        "rootfs.tar.gz": gzip.compress(plain),
        "random.tar": os.urandom(8192),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageCorruptError, match="is not a `docker save` archive"):
            await seeded.ensure(f"docker-archive:{tmp_path / name}")
    _intact(seeded, registry)
