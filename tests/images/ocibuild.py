"""Build OCI image layouts byte by byte, for tests.

Writing the layout ourselves (instead of `umoci repack`) gives tests full control over
each layer's tar entries: whiteouts, opaque dirs, hard links, device nodes, xattrs,
and hostile entries (`../` names, absolute symlinks) that no well-behaved tool emits.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Compression = Literal["gzip", "zstd", "none"]

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


@dataclass
class Entry:
    """One tar member. `kind`: file, dir, symlink, hardlink, chardev, blockdev, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)


def file(name: str, data: bytes | str = b"", mode: int = 0o644, **kw: Any) -> Entry:
    raw = data.encode() if isinstance(data, str) else data
    return Entry(name=name, kind="file", data=raw, mode=mode, **kw)


def dir_(name: str, mode: int = 0o755, **kw: Any) -> Entry:
    return Entry(name=name, kind="dir", mode=mode, **kw)


def symlink(name: str, target: str) -> Entry:
    return Entry(name=name, kind="symlink", linkname=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name=name, kind="hardlink", linkname=target)


def whiteout(path: str) -> Entry:
    parent, _, base = path.rstrip("/").rpartition("/")
    return file(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b"")


def opaque(dirpath: str) -> Entry:
    return file(f"{dirpath.rstrip('/')}/.wh..wh..opq", b"")


_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _KINDS[e.kind]
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.mtime = 1_700_000_000
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.devmajor, e.devminor
            if e.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind == "file":
                ti.size = len(e.data)
                tar.addfile(ti, io.BytesIO(e.data))
            else:
                tar.addfile(ti)
    return buf.getvalue()


def compress(raw: bytes, how: Compression) -> bytes:
    if how == "gzip":
        return gzip.compress(raw, mtime=0)
    if how == "zstd":
        out = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True)
        return out.stdout
    return raw


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        idx = path / "index.json"
        self.index: dict[str, Any] = (
            json.loads(idx.read_text()) if idx.exists() else {"schemaVersion": 2, "manifests": []}
        )

    def blob(self, data: bytes) -> str:
        d = sha(data)
        (self.path / "blobs" / "sha256" / d.split(":")[1]).write_bytes(data)
        return d

    def manifest(
        self,
        layers: list[list[Entry]] | list[bytes],
        *,
        config: dict[str, Any] | None = None,
        arch: str = "amd64",
        compression: Compression = "gzip",
        precompressed: bool = False,
    ) -> dict[str, Any]:
        """Write layers+config+manifest blobs; return the manifest descriptor.

        Layers given as bytes are tar archives, or with precompressed=True the exact blob
        bytes (to craft truncated or corrupt layers)."""
        layer_descs = []
        diff_ids = []
        for layer in layers:
            raw = layer if isinstance(layer, bytes) else make_tar(layer)
            comp = raw if precompressed else compress(raw, compression)
            diff_ids.append(sha(raw))
            layer_descs.append(
                {"mediaType": MT_LAYER[compression], "digest": self.blob(comp), "size": len(comp)}
            )
        cfg = {
            "architecture": arch,
            "os": "linux",
            "config": config or {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "ocibuild"} for _ in layers],
        }
        cfg_bytes = json.dumps(cfg).encode()
        man = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {
                "mediaType": MT_CONFIG,
                "digest": self.blob(cfg_bytes),
                "size": len(cfg_bytes),
            },
            "layers": layer_descs,
        }
        mb = json.dumps(man).encode()
        return {
            "mediaType": MT_MANIFEST,
            "digest": self.blob(mb),
            "size": len(mb),
            "platform": {"architecture": arch, "os": "linux"},
        }

    def tag(self, desc: dict[str, Any], tag: str) -> str:
        d = dict(desc)
        d["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.index["manifests"] = [
            m
            for m in self.index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
        ] + [d]
        (self.path / "index.json").write_text(json.dumps(self.index))
        return str(desc["digest"])

    def image_index(self, descs: list[dict[str, Any]]) -> dict[str, Any]:
        idx = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": descs}
        ib = json.dumps(idx).encode()
        return {"mediaType": MT_INDEX, "digest": self.blob(ib), "size": len(ib)}


def busybox_tree(
    extra: list[Entry] | None = None, *, osname: str = "isorun-busybox"
) -> list[Entry]:
    """A tiny musl/alpine-like root: static busybox, applet symlinks, /etc/os-release."""
    bb = Path("/bin/busybox").read_bytes()
    entries = [
        dir_("bin"),
        dir_("etc"),
        dir_("tmp", mode=0o1777),
        dir_("root", mode=0o700),
        dir_("proc"),
        dir_("sys"),
        dir_("dev"),
        dir_("usr"),
        dir_("usr/bin"),
        file("bin/busybox", bb, mode=0o755),
    ]
    for applet in ("sh", "ls", "cat", "echo", "id", "env", "pwd", "uname", "true"):
        entries.append(symlink(f"bin/{applet}", "busybox"))
    entries += [
        file("etc/os-release", f'ID={osname}\nNAME="{osname}"\n'),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"),
        file("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ]
    return entries + (extra or [])
