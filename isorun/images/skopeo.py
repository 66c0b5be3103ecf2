"""Registry access through skopeo.

Why skopeo (containers/image) rather than our own registry client: it already speaks the
Docker v2 and OCI distribution protocols, token auth, docker `config.json` credentials,
manifest lists, schema1/schema2/OCI conversion, gzip and zstd, and it verifies every blob's
digest while copying. It is packaged by Debian and maintained by the Podman team. We keep
the policy (which platform, which digest, size limits, error mapping) in Python.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isorun.images import proc
from isorun.images.config import Anonymous, Credentials, PullCredentials, StoreConfig
from isorun.images.errors import (
    ImageCorruptError,
    ImageError,
    ImageNotFoundError,
    ImageToolError,
    RegistryAuthError,
    RegistryRefusedError,
    RegistryUnreachableError,
    StoreFullError,
    UnsupportedImageError,
)
from isorun.images.pull_egress import pull_egress
from isorun.images.reference import ImageRef

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
MAX_MANIFEST = 4 * 1024 * 1024
POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


def classify(stderr: str, what: str) -> ImageError:
    """Map skopeo's stderr to our error hierarchy; the message names what to do."""
    low = stderr.lower()
    detail = proc.tail(stderr, 3)
    if "no space left on device" in low or "disk quota exceeded" in low:
        return StoreFullError(
            f"disk full while fetching {what}: free space in the image store "
            f"(e.g. `store.gc()`) and retry. ({detail})"
        )
    if "loading tar component manifest.json" in low:
        return ImageCorruptError(
            f"{what} is not a `docker save` archive: it has no readable manifest.json (a "
            "plain tar of a root filesystem, a compressed or truncated file, or not a tar at "
            "all). Export the image with `docker save` or `skopeo copy ... docker-archive:`, "
            f"or import an OCI layout with oci-layout:/dir:tag. ({detail})"
        )
    if "digest did not match" in low or "does not match" in low or "digest mismatch" in low:
        return ImageCorruptError(
            f"a blob of {what} does not match its digest: the registry "
            f"holds corrupt data; re-push the image. ({detail})"
        )
    if (
        "unexpected eof" in low
        or "invalid header" in low
        or "archive/tar" in low
        or "invalid checksum" in low
        or ("zstd" in low and "invalid" in low)
    ):
        return ImageCorruptError(
            f"a layer of {what} is truncated or not a valid archive; "
            f"re-push or re-export the image. ({detail})"
        )
    if (
        "unauthorized" in low
        or "authentication required" in low
        or "denied" in low
        or "invalid username/password" in low
        or "status 401" in low
    ):
        return RegistryAuthError(
            f"the registry refused access to {what}: check the username/"
            f"password or token (auth file or per-call credentials). "
            f"({detail})"
        )
    if (
        "manifest unknown" in low
        or "name unknown" in low
        or "not found" in low
        or "no descriptor found" in low
        or "no such file or directory" in low
        or "does not exist" in low
    ):
        return ImageNotFoundError(
            f"image {what} not found: check the name and tag, or that the file exists. ({detail})"
        )
    if (
        "connection refused" in low
        or "no such host" in low
        or "i/o timeout" in low
        or "network is unreachable" in low
        or "connection reset" in low
        or "x509" in low
        or "tls:" in low
        or "http response to https client" in low
        or "pinging container registry" in low
        or "dial tcp" in low
    ):
        return RegistryUnreachableError(
            f"cannot reach the registry for {what}: check the host "
            f"and port, network, and TLS settings (plain-HTTP "
            f"registries must be in insecure_registries). ({detail})"
        )
    return ImageToolError(f"skopeo failed on {what}: {detail}")


@dataclass(frozen=True)
class Resolved:
    """A source image pinned to one platform manifest."""

    digest: str  # manifest digest for our platform
    index_digest: str | None  # digest of the manifest list, when the ref named one
    manifest: dict[str, Any]
    layers_bytes: int  # sum of (compressed) layer sizes


class Skopeo:
    def __init__(self, cfg: StoreConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.policy = workdir / "policy.json"

    def _auth(self, ref: ImageRef, creds: PullCredentials, tmp: Path, flag: str) -> list[str]:
        """skopeo's auth flags (`flag` prefix: "" for inspect, "src-" for copy)."""
        if ref.transport != "registry":
            return []
        if isinstance(creds, Anonymous):
            # --no-creds: else skopeo still reads its default auth files. An empty cert dir:
            # else it presents the client certificate certs.d holds for that registry.
            empty = tmp / "no-certs"
            empty.mkdir(exist_ok=True)
            return [f"--{flag}no-creds", f"--{flag}cert-dir={empty}"]
        # Always a file of our choosing: without --authfile skopeo picks one by itself
        # ($XDG_RUNTIME_DIR/containers/auth.json, where `skopeo login` writes), and the
        # store would not know an image was fetched with that login (Image.private).
        authfile = self._write_creds(ref, creds, tmp) or self.cfg.auth_file
        return [f"--{flag}authfile={authfile or self._no_auth(tmp)}"]

    def _write_creds(self, ref: ImageRef, creds: Credentials | None, tmp: Path) -> Path | None:
        if creds is None:
            return None
        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        return _write_private(tmp / "auth.json", {"auths": {ref.registry: {"auth": token}}})

    def _no_auth(self, tmp: Path) -> Path:
        """An auth file with no credentials in it."""
        return _write_private(tmp / "no-auth.json", {})

    def _tls(self, ref: ImageRef, flag: str) -> list[str]:
        if ref.transport == "registry" and self.cfg.is_insecure(ref.registry):
            return [f"{flag}=false"]
        return []

    def _env(self, tmp: Path) -> dict[str, str]:
        return {"TMPDIR": str(tmp)}

    async def _run(
        self,
        ref: ImageRef,
        argv: list[str],
        tmp: Path,
        *,
        timeout: float,
        confined: bool,
        stdout_limit: int = proc.MAX_CAPTURE,
    ) -> bytes:
        """Run skopeo; `confined`, in a network namespace of its own that reaches only
        public addresses (pull_egress.py). Its stdout, or the error its failure means."""
        if not confined:
            res = await proc.run(
                argv, timeout=timeout, env=self._env(tmp), stdout_limit=stdout_limit
            )
        else:
            async with pull_egress() as egress:
                res = await proc.run(
                    [*egress.prefix, *argv],
                    timeout=timeout,
                    env=self._env(tmp) | egress.env,
                    stdout_limit=stdout_limit,
                )
                if res.returncode != 0 and egress.refused:
                    raise RegistryRefusedError(
                        f"{ref.name()}: the registry sent the pull on to {egress.refused[0]}; "
                        "it was stopped there"
                    )
        if res.returncode != 0:
            raise classify(res.stderr, ref.name())
        return res.stdout

    async def _raw(self, ref: ImageRef, auth: list[str], tmp: Path, confined: bool) -> bytes:
        self._ensure_policy()
        argv = [
            "skopeo",
            "inspect",
            "--raw",
            f"--policy={self.policy}",
            *auth,
            *self._tls(ref, "--tls-verify"),
            ref.skopeo(),
        ]
        return await self._run(
            ref,
            argv,
            tmp,
            timeout=min(self.cfg.pull_timeout_s, 120),
            confined=confined,
            stdout_limit=MAX_MANIFEST,
        )

    def _ensure_policy(self) -> None:
        if not self.policy.exists():
            self.policy.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.policy.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(POLICY))
            tmp.replace(self.policy)

    async def resolve(
        self, ref: ImageRef, creds: PullCredentials, tmp: Path, *, confined: bool = False
    ) -> Resolved:
        """Fetch the manifest (resolving a list to our platform) without pulling layers."""
        auth = self._auth(ref, creds, tmp, "")
        raw = await self._raw(ref, auth, tmp, confined)
        doc = _parse_manifest(raw, ref.name())
        index_digest: str | None = None
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if _media_type(doc) in INDEX_TYPES or "manifests" in doc:
            index_digest = digest
            digest = self._pick_platform(doc, ref.name())
            if ref.transport == "registry":
                raw = await self._raw(ref.with_digest(digest), auth, tmp, confined)
            else:
                raw = await self._raw_platform(ref, digest)
            if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
                raise ImageCorruptError(
                    f"manifest {digest} of {ref.name()} does not match its "
                    "digest: the source holds corrupt data"
                )
            doc = _parse_manifest(raw, ref.name())
        mt = _media_type(doc)
        if mt not in MANIFEST_TYPES and mt != "":
            raise UnsupportedImageError(
                f"{ref.name()} has manifest type {mt!r}; supported are "
                "OCI and Docker schema2 images"
            )
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise UnsupportedImageError(
                f"{ref.name()}: manifest has no layer list (Docker "
                "schema1 images are not supported; re-push with a "
                "current Docker or skopeo)"
            )
        size = _declared_size(doc.get("config"), "config", ref.name())
        for i, layer in enumerate(layers):
            size += _declared_size(layer, f"layer {i}", ref.name())
        return Resolved(digest, index_digest, doc, size)

    async def _raw_platform(self, ref: ImageRef, digest: str) -> bytes:
        """Read a platform manifest out of a local OCI layout (skopeo --raw gives the index)."""
        if ref.path is None or ref.transport != "oci-layout":
            raise UnsupportedImageError(
                f"{ref.name()}: a manifest list is only supported from a registry or an OCI layout"
            )
        blob = ref.path / "blobs" / "sha256" / digest.split(":", 1)[1]
        try:
            raw = _read_small_file(blob, MAX_MANIFEST)
        except OSError as exc:
            raise ImageCorruptError(
                f"{ref.name()}: manifest blob {digest} is missing from the layout ({exc.strerror})"
            ) from exc
        if raw is None:
            raise ImageCorruptError(
                f"{ref.name()}: manifest blob {digest} is not a regular file of at most "
                f"{MAX_MANIFEST} bytes; the layout is malformed or hostile"
            )
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise ImageCorruptError(
                f"{ref.name()}: manifest blob {digest} does not match its "
                "digest; the layout is corrupt"
            )
        return raw

    def _pick_platform(self, index: dict[str, Any], what: str) -> str:
        """Our platform's manifest digest in a manifest list, chosen as skopeo would: an
        entry we pick and skopeo does not would store one image under another's digest."""
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise ImageCorruptError(f"manifest list of {what}: 'manifests' is not a list")
        found: list[str] = []
        ours: list[dict[str, Any]] = []
        for i, m in enumerate(entries):
            plat = m.get("platform") if isinstance(m, dict) else None
            if not isinstance(m, dict) or not isinstance(plat, dict | None):
                raise ImageCorruptError(
                    f"manifest list of {what}: entry {i} is not a descriptor with a platform object"
                )
            plat = plat or {}
            os_, arch = str(plat.get("os", "")), str(plat.get("architecture", ""))
            found.append(f"{os_}/{arch}")
            if os_ == self.cfg.platform_os and arch == self.cfg.platform_arch:
                ours.append(m)
        want = f"{self.cfg.platform_os}/{self.cfg.platform_arch}"
        m = self._pick_variant(ours, what, want)
        if m is None:
            raise UnsupportedImageError(
                f"{what} has no {want} variant (it has: "
                f"{', '.join(found) or 'none'}); pick an image built for "
                f"{want}"
            )
        digest = m.get("digest")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise ImageCorruptError(
                f"manifest list of {what}: the {want} entry has digest {digest!r}, not sha256"
            )
        return digest

    def _pick_variant(
        self, ours: list[dict[str, Any]], what: str, want: str
    ) -> dict[str, Any] | None:
        """One entry of several for our os/arch, by containers/image's variant preference
        (arm64: v8, then none; others: none); anything else is ambiguous and refused."""
        if len(ours) <= 1:
            return ours[0] if ours else None
        variants = [str((m.get("platform") or {}).get("variant", "")) for m in ours]
        for pref in ("v8", "") if self.cfg.platform_arch == "arm64" else ("",):
            if variants.count(pref) == 1:
                return ours[variants.index(pref)]
            if variants.count(pref) > 1:
                break
        raise UnsupportedImageError(
            f"{what} lists {len(ours)} manifests for {want} (variants: "
            f"{', '.join(repr(v) for v in variants)}); which one to use is ambiguous, so the "
            "image was refused: list one manifest per platform"
        )

    async def copy(
        self,
        ref: ImageRef,
        digest: str,
        creds: PullCredentials,
        tmp: Path,
        layout: Path,
        *,
        confined: bool = False,
    ) -> None:
        """Copy the pinned image into an OCI layout at `layout` (tag `img`), verifying blobs."""
        self._ensure_policy()
        src = ref.with_digest(digest) if ref.transport == "registry" else ref
        argv = [
            "skopeo",
            f"--override-os={self.cfg.platform_os}",
            f"--override-arch={self.cfg.platform_arch}",
            "copy",
            "--quiet",
            f"--policy={self.policy}",
            "--retry-times=2",
            *self._auth(ref, creds, tmp, "src-"),
            *self._tls(ref, "--src-tls-verify"),
            src.skopeo(),
            f"oci:{layout}:img",
        ]
        await self._run(ref, argv, tmp, timeout=self.cfg.pull_timeout_s, confined=confined)


def _write_private(path: Path, doc: dict[str, Any]) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    return path


def _read_small_file(path: Path, limit: int) -> bytes | None:
    """`path`'s bytes, or None when it is a symlink, not a regular file or over `limit`:
    a layout is the caller's, and a blob linked to /dev/zero must not fill our memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        raw = f.read(limit + 1)
    return raw if len(raw) <= limit else None


def _declared_size(desc: Any, which: str, what: str) -> int:
    """The size a manifest declares for a blob: a non-negative integer, as the OCI spec
    requires. skopeo stops reading a blob at its declared size, but treats a negative one
    as "unknown" and reads on without bound, so a lying size must not pass."""
    size = desc.get("size") if isinstance(desc, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ImageCorruptError(
            f"manifest of {what}: {which} declares size {size!r}; a descriptor's size must "
            "be a non-negative integer, so the image is malformed or hostile and was refused"
        )
    return size


def _media_type(doc: dict[str, Any]) -> str:
    return str(doc.get("mediaType", ""))


def _parse_manifest(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ImageCorruptError(f"manifest of {what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ImageCorruptError(f"manifest of {what} is not a JSON object")
    return doc
