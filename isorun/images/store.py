"""The image store: references in, read-only ext4 root filesystems out, cached by digest.

Layout under `root`:
  images/<hex>/rootfs.ext4, image.json   finished images (only ever created by rename)
  tmp/build-<hex>-<rand>/                 work dirs; a crash leaves them, gc() removes them
  tmp/new-<label>-<rand>/                 a work dir for the instant before it is locked
  locks/<hex>.lock                        one converter per digest, across processes
  holders/<hex>/<holder-id>               who uses an image (remove is refused while any)
  refs.json                               names (tags, template names) → digests
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import errno
import json
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from isorun.images import ext4, unpack
from isorun.images.config import (
    ANONYMOUS,
    Anonymous,
    Credentials,
    ImageConfig,
    PullCredentials,
    StoreConfig,
)
from isorun.images.errors import (
    ImageError,
    ImageInUseError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidReferenceError,
    RegistryAuthError,
    RegistryRefusedError,
    RegistryUnreachableError,
    StoreFullError,
)
from isorun.images.fstree import remove_tree
from isorun.images.holders import Holders
from isorun.images.layout import TAG, Layout
from isorun.images.locks import file_lock, try_lock, try_lock_dir, unlock
from isorun.images.progress import Progress, ProgressEvent, emitter, watch_bytes
from isorun.images.reference import ImageRef, parse_reference
from isorun.images.refs import Refs
from isorun.images.registry_policy import RegistryPolicy
from isorun.images.skopeo import Resolved, Skopeo
from isorun.images.templates import Template, TemplateSet, build_rootfs

PullPolicy = Literal["missing", "always"]
_META = "image.json"
_ROOTFS = "rootfs.ext4"
_HOLD_ATTEMPTS = 3  # ensure+acquire rounds lost to a concurrent gc before giving up
_STAGING = "new-"  # a work dir's name until it is locked
STAGING_GRACE_S = 60.0  # an unlocked staging dir younger than this may be about to be locked


# What a registry lookup can fail with when the name was simply wrong or unreachable.
_NOT_FETCHED = (
    ImageNotFoundError,
    RegistryAuthError,
    RegistryRefusedError,
    RegistryUnreachableError,
)
# A reference with no registry, repository path, tag or digest: what a template name is.
_BARE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
# locks/<hex>.lock, as _lock_path names them
_LOCK_NAME = re.compile(r"[0-9a-f]{64}\.lock")


@dataclass(frozen=True)
class Image:
    """A converted image. `rootfs` is shared read-only by every sandbox of this digest."""

    digest: str
    rootfs: Path
    config: ImageConfig
    size_bytes: int  # size of the ext4 disk the guest sees
    disk_bytes: int  # bytes it occupies on the host (the file is sparse)
    content_bytes: int  # bytes of the unpacked tree
    source: str  # the reference it was first made from
    created: float
    names: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    # Who may be handed it without fetching it again: "" anyone; else it may have been
    # fetched with the store's credentials for this registry (or from a host path, HOST_PATH),
    # and only a pull policy naming that registry hands it out (ImageStore.ensure).
    private: str = ""


HOST_PATH = "host path"


@dataclass(frozen=True)
class DiskUsage:
    images: int
    image_bytes: int  # allocated bytes of finished images
    tmp_bytes: int  # allocated bytes of work dirs (in-progress or crashed builds)
    per_image: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class GcReport:
    removed: builtins.list[str]
    freed_bytes: int


@dataclass
class StoreStats:
    conversions: int = 0
    cache_hits: int = 0


def admits(policy: RegistryPolicy | None, img: Image) -> bool:
    """Whether a caller pulling under `policy` may be handed the stored `img` as it is: an
    image the store's credentials may have fetched goes only to those whose policy names its
    registry (the operator's private images are not every tenant's)."""
    return policy is None or not img.private or img.private in policy.named


def _hex(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise InvalidReferenceError(f"invalid digest {digest!r}: expected sha256:<64 hex>")
    return hexd


def _allocated(path: Path) -> int:
    if path.is_file():
        return path.stat().st_blocks * 512
    return unpack.tree_usage(path)[0]


class ImageStore:
    """Async image cache. Safe to share between tasks and between processes on one root."""

    def __init__(self, root: Path, config: StoreConfig | None = None) -> None:
        self.root = Path(root)
        self.cfg = config or StoreConfig()
        self.templates = TemplateSet(self.cfg.template_dirs)
        self.stats = StoreStats()
        for sub in ("images", "tmp", "locks", "holders"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Images may be private (a tenant's registry credentials pulled them; their config
        # may hold secrets in Env): no other local user may read them. QEMU opens a rootfs
        # before it drops to its unprivileged user, and a warm start passes it as an fd.
        for sub in ("images", "tmp"):
            os.chmod(self.root / sub, 0o700)
        self._refs = Refs(self.root / "refs.json")
        self._holders = Holders(self.root / "holders")
        self._skopeo = Skopeo(self.cfg, self.root)
        # conversions at once: many tenants pulling different images each ran skopeo, umoci
        # and mkfs.ext4 beside the others, with nothing bounding the host's cores and disk
        self._conversions = asyncio.Semaphore(max(1, self.cfg.max_conversions))

    # ---- paths -------------------------------------------------------------------------

    def _image_dir(self, digest: str) -> Path:
        return self.root / "images" / _hex(digest)

    def _lock_path(self, digest: str) -> Path:
        return self.root / "locks" / f"{_hex(digest)}.lock"

    def _load(self, digest: str) -> Image | None:
        d = self._image_dir(digest)
        try:
            meta: dict[str, Any] = json.loads((d / _META).read_text())
        except (FileNotFoundError, ValueError):
            return None
        rootfs = d / _ROOTFS
        if not rootfs.is_file():
            return None
        return Image(
            digest=meta["digest"],
            rootfs=rootfs,
            config=ImageConfig.from_json(meta["config"]),
            size_bytes=rootfs.stat().st_size,
            disk_bytes=_allocated(rootfs),
            content_bytes=int(meta.get("content_bytes", 0)),
            source=meta.get("source", ""),
            created=float(meta.get("created", 0)),
            names=tuple(self._refs.names_of(digest)),
            layers=tuple(meta.get("layers", [])),
            private=str(meta["private"]) if "private" in meta else self._private_unmarked(meta),
        )

    def _private_unmarked(self, meta: dict[str, Any]) -> str:
        """Image.private of an image stored before images were marked: judged from where it
        came from as a pull from there would be now (an operator who pulled with a login
        this store still holds keeps that image from the tenants the login is not theirs)."""
        if "template" in meta:
            return ""  # built here from packages
        try:
            source = parse_reference(str(meta.get("source", "")))
        except InvalidReferenceError:
            return HOST_PATH  # not knowing where it came from: the operator's alone
        return self._private(source, None)

    # ---- ensure ------------------------------------------------------------------------

    def parse(self, ref: str) -> ImageRef:
        return parse_reference(ref, self.templates.names())

    async def ensure(
        self,
        ref: str,
        *,
        credentials: Credentials | None = None,
        pull: PullPolicy = "missing",
        progress: Progress | None = None,
        holder: str | None = None,
        policy: RegistryPolicy | None = None,
    ) -> Image:
        """Return the converted image for `ref`, pulling/building it if needed.

        pull="missing" (default) uses a cached tag without asking the registry, as
        `docker run` does; pull="always" re-resolves tags (conversion still happens only
        when the digest changed). `progress` receives phase events (see
        `isorun.images.progress`); the last one is `done`. With `holder`, the image is
        also acquired for it: a gc or remove (in any process) between finding the image and
        holding it makes ensure fetch it again rather than hand back a deleted image. With
        `policy` (a pull on someone else's behalf), a registry is asked only if the policy
        allows it, and anonymously where the policy says so; a stored image needs no asking.
        """
        raw = emitter(progress)

        def emit(ev: ProgressEvent) -> None:  # every event names the ref the caller gave
            raw(dataclasses.replace(ev, ref=ref))

        img = await self._ensure(ref, credentials, pull, emit, policy)
        if holder is not None:
            img = await self._hold(
                ref, img, holder, lambda: self._ensure(ref, credentials, pull, emit, policy)
            )
        emit(
            ProgressEvent(
                "done", ref, f"{img.digest} ready", digest=img.digest, bytes_total=img.size_bytes
            )
        )
        return img

    async def _hold(
        self, ref: str, img: Image, holder: str, refetch: Callable[[], Awaitable[Image]]
    ) -> Image:
        """Acquire img for holder; if a gc/remove took it in between, fetch it again."""
        for _ in range(_HOLD_ATTEMPTS):
            try:
                return await self.acquire(img.digest, holder)
            except ImageNotFoundError:
                img = await refetch()
        raise ImageError(
            f"{ref}: removed by a concurrent gc or remove {_HOLD_ATTEMPTS} times before it "
            "could be held; try again"
        )

    async def _ensure(
        self,
        ref: str,
        credentials: PullCredentials,
        pull: PullPolicy,
        emit: Progress,
        policy: RegistryPolicy | None,
    ) -> Image:
        r = self.parse(ref)
        if r.transport == "template":
            t = self.templates.get(r.repository)
            return await self._ensure_digest(
                t.digest, r.name(), lambda tmp: self._build_template(t, tmp, emit), emit
            )
        if r.transport == "registry" and pull == "missing":
            # The policy before the cache: a stored image is not handed out, nor given a
            # name, under a registry the caller may not name (by digest, any name would do).
            # Only as far as it goes without DNS: a cache hit must not wait on a resolver
            # (an offline host, DNS down: 10 s a create). A name whose registry was not
            # judged (public, unless it resolves to a private address) is not recorded.
            judged = policy is None or policy.check_without_dns(r) is not None
            # By name first: a manifest-list digest names the platform image it resolved to.
            known = self._refs.read().get(r.name()) or r.digest
            img = self._load(known) if known else None
            if img is not None and admits(policy, img):
                self.stats.cache_hits += 1
                if judged and (policy is None or r.digest is None):
                    # a caller's digest ref no registry was asked about names nothing: by
                    # digest it is found anyway, and a tenant's would grow refs.json at will
                    await self._refs.set(r.name(), img.digest)
                emit(ProgressEvent("cached", ref, "already in the store", digest=img.digest))
                return img
        # A registry the policy admits as public is one the caller chose: pulled without the
        # store's credentials, and confined to public addresses all the way (pull_egress.py).
        confined = policy is not None and await policy.check(r) == "anonymous"
        if confined and credentials is None:
            credentials = ANONYMOUS
        emit(ProgressEvent("resolving", ref, f"resolving {r.name()}"))
        try:
            with self._workdir("resolve") as tmp:
                resolved = await self._skopeo.resolve(r, credentials, tmp, confined=confined)
        except _NOT_FETCHED as exc:
            raise self._maybe_misspelt_template(ref, exc) from exc
        if r.digest and r.digest not in (resolved.digest, resolved.index_digest):
            raise ImageError(f"{r.name()}: registry returned manifest {resolved.digest}")
        if resolved.layers_bytes > self.cfg.max_image_bytes:
            raise ImageTooLargeError(
                f"{r.name()} has {resolved.layers_bytes} bytes of compressed layers, over the "
                f"store limit of {self.cfg.max_image_bytes}; raise max_image_bytes or use a "
                "smaller image"
            )
        if (img := self._load(resolved.digest)) is not None:
            if not admits(policy, img):
                await self._prove_fetchable(r, resolved, credentials, emit, confined)
            self.stats.cache_hits += 1
            await self._refs.set(r.name(), resolved.digest)
            emit(ProgressEvent("cached", ref, "already in the store", digest=img.digest))
            if resolved.index_digest and r.transport == "registry":
                await self._refs.set(r.with_digest(resolved.index_digest).name(), img.digest)
            return self._load(img.digest) or img  # with the names just given it
        img = await self._ensure_digest(
            resolved.digest,
            r.name(),
            lambda tmp: self._build_pulled(r, resolved, credentials, tmp, emit, confined),
            emit,
        )
        if not admits(policy, img):  # stored meanwhile by another's pull, not built by ours
            await self._prove_fetchable(r, resolved, credentials, emit, confined)
        if resolved.index_digest and r.transport == "registry":
            await self._refs.set(r.with_digest(resolved.index_digest).name(), img.digest)
        return img

    async def _ensure_digest(
        self,
        digest: str,
        name: str,
        build: Callable[[Path], Awaitable[dict[str, Any]]],
        emit: Progress,
    ) -> Image:
        if (img := self._load(digest)) is None:
            async with self._digest_lock(digest, name, emit):
                img = self._load(digest)
                if img is None:
                    await self._convert(digest, name, build)
                    img = self._load(digest)
                    if img is None:  # pragma: no cover - rename succeeded, so it exists
                        raise ImageError(f"image {digest} vanished right after conversion")
                else:
                    self.stats.cache_hits += 1
                    emit(ProgressEvent("cached", name, "built by another pull", digest=digest))
        else:
            self.stats.cache_hits += 1
            emit(ProgressEvent("cached", name, "already in the store", digest=digest))
        await self._refs.set(name, digest)
        return self._load(digest) or img

    @contextlib.asynccontextmanager
    async def _conversion_slot(self, name: str, digest: str, emit: Progress) -> Any:
        """One of the store's max_conversions slots, held by the work that takes a core and
        the disk (unpack, mkfs, a template build), not by a download: a slow registry would
        keep every other pull waiting. Says `waiting` when all are taken."""
        if self._conversions.locked():
            emit(
                ProgressEvent(
                    "waiting",
                    name,
                    f"{self.cfg.max_conversions} other image conversions are running",
                    digest=digest,
                )
            )
        async with self._conversions:
            yield

    @contextlib.asynccontextmanager
    async def _digest_lock(self, digest: str, name: str, emit: Progress) -> Any:
        """The per-digest conversion lock; says `waiting` when another converter holds it."""
        fd = try_lock(self._lock_path(digest))
        if fd is not None:
            try:
                yield
            finally:
                unlock(fd)
            return
        emit(
            ProgressEvent(
                "waiting", name, "another pull or build of this image is running", digest=digest
            )
        )
        async with file_lock(self._lock_path(digest)):
            yield

    @contextlib.contextmanager
    def _workdir(self, label: str) -> Any:
        """A fresh dir under tmp/, locked while in use (gc removes unlocked ones). It is
        made under a `new-` name and takes its own only once locked: gc never sees it
        unlocked under a name it would remove."""
        staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{label}-", dir=self.root / "tmp"))
        fd = try_lock_dir(staging)
        if fd is None:  # out of fds, say: unlocked, gc could take it from under us
            remove_tree(staging)
            raise OSError(f"cannot lock the work dir {staging}")
        tmp = staging.with_name(staging.name.removeprefix(_STAGING))
        try:
            os.rename(staging, tmp)
        except OSError:
            remove_tree(staging)
            unlock(fd)
            raise
        try:
            yield tmp
        finally:
            try:
                remove_tree(tmp)
            finally:
                unlock(fd)  # whatever removal raised: a held lock would pin the dir for good

    async def _convert(
        self, digest: str, name: str, build: Callable[[Path], Awaitable[dict[str, Any]]]
    ) -> None:
        """Build into tmp/, then rename into images/: all or nothing."""
        with self._workdir(f"build-{_hex(digest)}") as tmp:
            try:
                meta = await build(tmp)
                meta.update({"digest": digest, "source": name, "created": time.time()})
                out = tmp / "out"
                (out / _META).write_text(json.dumps(meta, indent=1))
                with (out / _META).open("rb+") as f:
                    os.fsync(f.fileno())
                os.rename(out, self._image_dir(digest))
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StoreFullError(
                        f"disk full while converting {name}: free space in "
                        f"{self.root} (e.g. store.gc()) and retry"
                    ) from exc
                raise
            self.stats.conversions += 1

    async def _build_pulled(
        self,
        r: ImageRef,
        resolved: Resolved,
        creds: PullCredentials,
        tmp: Path,
        emit: Progress,
        confined: bool,
    ) -> dict[str, Any]:
        layout_dir = tmp / "layout"
        digest, total = resolved.digest, resolved.layers_bytes

        def pulled(n: int) -> None:
            emit(
                ProgressEvent(
                    "pulling",
                    r.name(),
                    f"copying layers of {digest}",
                    digest=digest,
                    bytes_done=n,
                    bytes_total=total,
                )
            )

        pulled(0)
        async with watch_bytes(layout_dir, total, pulled):
            await self._skopeo.copy(r, digest, creds, tmp, layout_dir, confined=confined)
        pulled(total)
        layout = Layout(layout_dir)
        # The image is stored under `digest`: it must be what skopeo copied (a local layout
        # is copied by tag, and skopeo may pick another platform entry than we resolved).
        layout.check_copied(digest, resolved.manifest, r.name())
        async with self._conversion_slot(r.name(), digest, emit):
            emit(ProgressEvent("unpacking", r.name(), "applying layers", digest=digest))
            await layout.decompress_zstd_layers(self.cfg.max_image_bytes)
            li = layout.read()
            tree = tmp / "rootfs"
            await unpack.unpack(
                layout_dir,
                TAG,
                tree,
                timeout=self.cfg.pull_timeout_s,
                max_bytes=self.cfg.max_image_bytes,
                max_files=self.cfg.max_image_files,
            )
            remove_tree(layout_dir)
            meta = await self._finish_tree(r.name(), tree, tmp, emit, digest)
        meta["private"] = self._private(r, creds)
        meta["config"] = li.config.to_json()
        meta["layers"] = [str(x.get("digest")) for x in li.manifest.get("layers", [])]
        return meta

    async def _prove_fetchable(
        self,
        r: ImageRef,
        resolved: Resolved,
        creds: PullCredentials,
        emit: Progress,
        confined: bool,
    ) -> None:
        """The stored image of this digest is one the caller's policy does not admit (the
        operator's, fetched with the store's login or imported from a host path): it is
        handed over only once the caller's own pull has copied every layer of it (skopeo
        checks each blob against its digest). A registry the caller may use serving just
        the manifest bytes of a private image's digest gets nothing."""
        with self._workdir("prove") as tmp:
            layout_dir = tmp / "layout"
            emit(
                ProgressEvent(
                    "pulling",
                    r.name(),
                    f"copying layers of {resolved.digest} (stored, but not from a source "
                    "this pull may use)",
                    digest=resolved.digest,
                    bytes_done=0,
                    bytes_total=resolved.layers_bytes,
                )
            )
            await self._skopeo.copy(r, resolved.digest, creds, tmp, layout_dir, confined=confined)
            Layout(layout_dir).check_copied(resolved.digest, resolved.manifest, r.name())

    def _maybe_misspelt_template(self, ref: str, exc: ImageError) -> ImageError:
        """A bare name that is no template (`pyhton`) went to Docker Hub: say so, and name
        the templates, rather than leave only Docker Hub's refusal."""
        if not _BARE_NAME.fullmatch(ref):
            return exc
        names = ", ".join(sorted(self.templates.names())) or "none"
        return type(exc)(
            f"{exc} ({ref!r} is not a template, so it was looked up as "
            f"docker.io/library/{ref}; the templates are: {names})"
        )

    def _private(self, r: ImageRef, creds: PullCredentials) -> str:
        """Image.private of an image fetched from r with creds."""
        if r.transport != "registry":
            return HOST_PATH
        if isinstance(creds, Anonymous):
            return ""
        if creds is not None or self.cfg.may_hold_credentials_for(r.registry):
            return r.registry.lower()
        return ""

    async def _build_template(self, t: Template, tmp: Path, emit: Progress) -> dict[str, Any]:
        tree = tmp / "rootfs"
        async with self._conversion_slot(t.name, t.digest, emit):
            emit(
                ProgressEvent(
                    "building",
                    t.name,
                    f"mmdebstrap {t.suite} with {len(t.packages)} packages",
                    digest=t.digest,
                )
            )
            await build_rootfs(t, tree, self.cfg, tmp)
            meta = await self._finish_tree(f"template:{t.name}", tree, tmp, emit, t.digest)
        meta["config"] = t.config.to_json()
        meta["template"] = t.model_dump(mode="json")
        return meta

    async def _finish_tree(
        self, name: str, tree: Path, tmp: Path, emit: Progress, digest: str
    ) -> dict[str, Any]:
        size = await asyncio.to_thread(ext4.measure, tree)
        emit(
            ProgressEvent(
                "converting",
                name,
                f"mkfs.ext4 of {size.data_bytes} bytes",
                digest=digest,
                bytes_total=size.data_bytes,
            )
        )
        if size.data_bytes > self.cfg.max_image_bytes:
            raise ImageTooLargeError(
                f"{name} unpacks to {size.data_bytes} bytes, over the store limit of "
                f"{self.cfg.max_image_bytes}; raise max_image_bytes or use a smaller image"
            )
        if size.inodes > self.cfg.max_image_files:
            raise ImageTooLargeError(
                f"{name} has {size.inodes} files and directories, over the store limit of "
                f"{self.cfg.max_image_files}; raise max_image_files or use a smaller image"
            )
        out = tmp / "out"
        out.mkdir()
        await ext4.make_ext4(tree, out / _ROOTFS, size, timeout=self.cfg.pull_timeout_s)
        await asyncio.to_thread(remove_tree, tree)
        return {"content_bytes": size.data_bytes, "inodes": size.inodes}

    # ---- management --------------------------------------------------------------------

    def list(self) -> list[Image]:
        out = []
        for d in sorted((self.root / "images").iterdir()):
            img = self._load("sha256:" + d.name)
            if img is not None:
                out.append(img)
        return out

    def _resolve_local(self, ref: str) -> str:
        """A local name or digest → digest, without network."""
        if ref.startswith("sha256:"):
            _hex(ref)
            return ref
        r = self.parse(ref)
        if r.transport == "template":
            return self.templates.get(r.repository).digest
        digest = self._refs.read().get(r.name()) or r.digest
        if digest is None:
            raise ImageNotFoundError(
                f"no local image named {r.name()} (`isorun images` lists them)"
            )
        return digest

    def inspect(self, ref: str) -> Image:
        digest = self._resolve_local(ref)
        img = self._load(digest)
        if img is None:
            raise ImageNotFoundError(
                f"image {ref} ({digest}) is not in the store; store.ensure() it first"
            )
        return img

    async def remove(self, ref: str) -> Image:
        """Remove an image and its names; refused while any holder uses it."""
        digest = self._resolve_local(ref)
        async with file_lock(self._lock_path(digest)):
            img = self._load(digest)
            if img is None:
                raise ImageNotFoundError(f"image {ref} is not in the store")
            holders = self._holders.list(_hex(digest))
            if holders:
                raise ImageInUseError(
                    f"image {ref} is in use by {', '.join(holders)}; destroy those sandboxes/"
                    "snapshots (or release them) first",
                    holders,
                )
            await self._refs.drop_digest(digest)
            trash = Path(tempfile.mkdtemp(prefix="rm-", dir=self.root / "tmp"))
            os.rename(self._image_dir(digest), trash / "img")
            await asyncio.to_thread(remove_tree, trash)
            self._holders.clear(_hex(digest))
        return img

    async def acquire(self, digest: str, holder_id: str) -> Image:
        """Record that `holder_id` (a sandbox or snapshot) uses this image."""
        async with file_lock(self._lock_path(digest)):
            img = self._load(digest)
            if img is None:
                raise ImageNotFoundError(
                    f"image {digest} is not in the store; ensure() it before acquiring"
                )
            self._holders.add(_hex(digest), holder_id)
            return img

    async def release(self, digest: str, holder_id: str) -> bool:
        """Drop a holder; returns False when it was not registered. Never raises for that."""
        async with file_lock(self._lock_path(digest)):
            return self._holders.remove(_hex(digest), holder_id)

    def holders(self, digest: str) -> builtins.list[str]:
        return self._holders.list(_hex(digest))

    async def gc(self, *, all_unused: bool = False) -> GcReport:
        """Delete unheld images without a name (or all unheld ones with all_unused=True),
        and work dirs left by crashed pulls and conversions."""
        removed: builtins.list[str] = []
        freed = 0
        for img in self.list():
            if self.holders(img.digest) or (img.names and not all_unused):
                continue
            try:
                await self.remove(img.digest)
            except ImageInUseError:
                continue
            removed.append(img.digest)
            freed += img.disk_bytes
        for d in (self.root / "tmp").iterdir():
            if d.name.startswith("build-"):
                hexd = d.name.split("-")[1]
                fd = try_lock(self.root / "locks" / f"{hexd}.lock")
                if fd is None:
                    continue  # a conversion is running right now
                try:
                    freed += _allocated(d)
                    remove_tree(d)
                finally:
                    unlock(fd)
            elif d.name.startswith(_STAGING):
                # Between mkdtemp and its lock (an instant), or left empty by a crash then.
                with contextlib.suppress(OSError):
                    if time.time() - d.stat().st_mtime > STAGING_GRACE_S:
                        d.rmdir()
            elif d.name.startswith("rm-"):
                freed += _allocated(d)
                remove_tree(d)
            elif d.is_dir() and (fd := try_lock_dir(d)) is not None:
                # Left by a crashed pull (its lock died with it): it may hold the
                # registry credentials skopeo was given (auth.json).
                try:
                    freed += _allocated(d)
                    remove_tree(d)
                finally:
                    unlock(fd)
        self._prune_locks()
        return GcReport(removed, freed)

    def _prune_locks(self) -> None:
        """Remove the lock files of digests with no image: every pull leaves one (a failed
        or removed one too), and locks/ grew for good. Each goes under its own lock; whoever
        waits on a removed file takes the one made anew at its path (locks.try_lock)."""
        for path in (self.root / "locks").iterdir():
            hexd = path.name.removesuffix(".lock")
            if not _LOCK_NAME.fullmatch(path.name) or (self.root / "images" / hexd).exists():
                continue
            fd = try_lock(path)
            if fd is None:
                continue  # a pull, build, acquire or release of it is running
            try:
                if not (self.root / "images" / hexd).exists():
                    path.unlink(missing_ok=True)
            finally:
                unlock(fd)

    def disk_usage(self) -> DiskUsage:
        per = {img.digest: img.disk_bytes for img in self.list()}
        return DiskUsage(
            images=len(per),
            image_bytes=sum(per.values()),
            tmp_bytes=_allocated(self.root / "tmp"),
            per_image=per,
        )
