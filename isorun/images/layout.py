"""Read (and, for zstd layers, rewrite) the private OCI layout a pull produced.

umoci 0.4.7 (Debian bookworm) rejects `tar+zstd` layers. skopeo has already verified each
blob's digest, so we decompress zstd layers to plain tar with the `zstandard` package,
check the result against the config's diff_id, and point the manifest at the plain layer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from isorun.images.config import ImageConfig
from isorun.images.errors import (
    ImageCorruptError,
    ImageTooLargeError,
    StoreFullError,
    UnsupportedImageError,
)

TAG = "img"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
SUPPORTED = (LAYER_TAR, LAYER_GZIP, LAYER_ZSTD, NONDIST, NONDIST + "+gzip")
MAX_JSON = 4 * 1024 * 1024


@dataclass(frozen=True)
class LayoutImage:
    manifest: dict[str, Any]
    config_blob: dict[str, Any]
    config: ImageConfig


def _digest_of(desc: Any, what: str) -> str:
    digest = desc.get("digest") if isinstance(desc, dict) else None
    if not isinstance(digest, str):
        raise ImageCorruptError(f"image {what} descriptor has no digest")
    return digest


class Layout:
    def __init__(self, path: Path) -> None:
        self.path = path

    def blob_path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise ImageCorruptError(f"unsupported or malformed digest {digest!r} in image")
        return self.path / "blobs" / "sha256" / hexd

    def _json(self, path: Path) -> dict[str, Any]:
        with path.open("rb") as f:
            raw = f.read(MAX_JSON + 1)
        if len(raw) > MAX_JSON:
            raise ImageCorruptError(f"{path.name}: JSON document larger than {MAX_JSON} bytes")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise ImageCorruptError(f"{path.name}: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise ImageCorruptError(f"{path.name}: expected a JSON object")
        return doc

    def _index_entry(self) -> tuple[dict[str, Any], dict[str, Any]]:
        index = self._json(self.path / "index.json")
        entries = index.get("manifests", [])
        if not isinstance(entries, list):
            raise ImageCorruptError("index.json: 'manifests' is not a list")
        for i, m in enumerate(entries):
            notes = m.get("annotations", {}) if isinstance(m, dict) else None
            if not isinstance(notes, dict):
                raise ImageCorruptError(
                    f"index.json: manifests[{i}] is not a descriptor with an annotations object"
                )
            if notes.get("org.opencontainers.image.ref.name") == TAG:
                return index, m
        raise ImageCorruptError("pulled layout has no image tagged 'img'")

    def _manifest_and_config(
        self, entry: dict[str, Any]
    ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        """The manifest, its layer descriptors and the config blob, shape-checked: they
        come from the image, and a wrong type must be an ImageCorruptError, not a crash."""
        manifest = self._json(self.blob_path(_digest_of(entry, "manifest")))
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
            raise ImageCorruptError("image manifest 'layers' is not a list of descriptors")
        for layer in layers:
            _digest_of(layer, "layer")
        cfg = self._json(self.blob_path(_digest_of(manifest.get("config"), "config")))
        return manifest, layers, cfg

    def check_copied(self, digest: str, expected: dict[str, Any], what: str) -> None:
        """Refuse a copy that is not the manifest `digest` we resolved (`expected`).

        skopeo may rewrite a manifest, changing its digest: compressing plain layers (then a
        layer's old digest is its diff_id, which unpacking checks) or converting Docker to
        OCI (which also re-serialises the config). Otherwise the config must be the same."""
        _, entry = self._index_entry()
        got = _digest_of(entry, "manifest")
        if got == digest:
            return
        manifest, layers, cfg = self._manifest_and_config(entry)
        want = expected.get("layers")
        want_layers = [_digest_of(x, "layer") for x in (want if isinstance(want, list) else [])]
        rootfs = cfg.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        diff_ids = diff_ids if isinstance(diff_ids, list) else []
        same = len(layers) == len(want_layers) and all(
            w in (layer["digest"], diff_ids[i] if i < len(diff_ids) else None)
            for i, (w, layer) in enumerate(zip(want_layers, layers, strict=True))
        )
        if expected.get("mediaType") != DOCKER_MANIFEST:
            same = same and _digest_of(manifest.get("config"), "config") == _digest_of(
                expected.get("config"), "config"
            )
        if not same:
            raise ImageCorruptError(
                f"{what}: resolved to manifest {digest}, but the copy holds manifest {got} "
                "with a different config or layers; the source is ambiguous or hostile, "
                "so it was refused rather than stored under the wrong digest"
            )

    def read(self) -> LayoutImage:
        _, entry = self._index_entry()
        manifest, layers, cfg = self._manifest_and_config(entry)
        for layer in layers:
            if layer.get("mediaType") not in SUPPORTED:
                raise UnsupportedImageError(
                    f"layer {layer.get('digest')} has media type {layer.get('mediaType')!r}; "
                    f"supported: {', '.join(SUPPORTED)}"
                )
        os_ = cfg.get("os", "linux")
        if os_ != "linux":
            raise UnsupportedImageError(f"image is built for os {os_!r}; only linux images run")
        inner = cfg.get("config") or {}
        if not isinstance(inner, dict):
            raise ImageCorruptError("image config 'config' field is not an object")
        return LayoutImage(manifest, cfg, ImageConfig.from_oci(inner))

    async def decompress_zstd_layers(self, max_bytes: int) -> int:
        """Replace zstd layers by plain tar ones; returns how many were converted.

        Writes at most `max_bytes` of tar in all (ImageTooLargeError past that): a zstd
        layer of a few KB can decompress to terabytes."""
        index, entry = self._index_entry()
        manifest, layers, cfg = self._manifest_and_config(entry)
        rootfs = cfg.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list):
            raise ImageCorruptError("image config has no rootfs.diff_ids list")
        converted = 0
        # An image may list one blob twice: decompress it once, unlink sources at the end.
        done: dict[str, tuple[str, int]] = {}
        for i, layer in enumerate(layers):
            if layer.get("mediaType") != LAYER_ZSTD:
                continue
            if layer["digest"] not in done:
                src = self.blob_path(layer["digest"])
                done[layer["digest"]] = await asyncio.to_thread(self._decompress, src, max_bytes)
                max_bytes -= done[layer["digest"]][1]
            digest, size = done[layer["digest"]]
            if i < len(diff_ids) and diff_ids[i] != digest:
                raise ImageCorruptError(
                    f"zstd layer {layer['digest']} decompresses to {digest}, "
                    f"but the image config says {diff_ids[i]}"
                )
            layer["mediaType"] = LAYER_TAR
            layer["digest"] = digest
            layer["size"] = size
            converted += 1
        for zstd_digest in done:
            self.blob_path(zstd_digest).unlink()
        if converted:
            raw = json.dumps(manifest).encode()
            mdigest = "sha256:" + hashlib.sha256(raw).hexdigest()
            self.blob_path(mdigest).write_bytes(raw)
            entry.update({"digest": mdigest, "size": len(raw), "mediaType": MT_MANIFEST})
            (self.path / "index.json").write_text(json.dumps(index))
        return converted

    def _decompress(self, src: Path, max_bytes: int) -> tuple[str, int]:
        tmp = src.with_name(src.name + ".tar.tmp")
        h = hashlib.sha256()
        size = 0
        try:
            with src.open("rb") as fin, tmp.open("wb") as fout:
                reader = zstandard.ZstdDecompressor().stream_reader(fin, read_across_frames=True)
                while chunk := reader.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise ImageTooLargeError(
                            f"zstd layer {src.name} decompresses to more than the "
                            f"{max_bytes} bytes left under the store limit; raise "
                            "max_image_bytes or use a smaller image"
                        )
                    h.update(chunk)
                    fout.write(chunk)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, zstandard.ZstdError):
                raise ImageCorruptError(f"zstd layer {src.name} is corrupt: {exc}") from exc
            if isinstance(exc, OSError) and exc.errno == 28:
                raise StoreFullError(
                    "disk full while decompressing a zstd layer: free space "
                    "in the image store and retry"
                ) from exc
            raise
        digest = "sha256:" + h.hexdigest()
        os.replace(tmp, self.blob_path(digest))
        return digest, size
