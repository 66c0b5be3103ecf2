"""Parse the image references users type into one normalized form.

Accepted forms:
  python                      the built-in template of that name, else docker.io/library/python
  python:3.12                 docker.io/library/python:3.12 (Docker Hub is the default registry)
  ghcr.io/acme/env@sha256:…   any registry, by tag or digest
  localhost:5000/x:tag        first component is a host when it has `.`/`:` or is `localhost`
  oci-layout:/path[:tag]      an OCI image layout directory (offline import)
  docker-archive:/path.tar    a `docker save` tarball (offline import)
  template:python             always the template, never Docker Hub
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from isorun.images.errors import InvalidReferenceError

DEFAULT_REGISTRY = "docker.io"
Transport = Literal["registry", "oci-layout", "docker-archive", "template"]

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")
_TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference. `name()` is its canonical string."""

    transport: Transport
    registry: str = ""
    repository: str = ""
    tag: str | None = None
    digest: str | None = None
    path: Path | None = None

    def name(self) -> str:
        if self.transport == "template":
            return f"template:{self.repository}"
        if self.transport == "registry":
            base = f"{self.registry}/{self.repository}"
            if self.digest:
                return f"{base}@{self.digest}"
            return f"{base}:{self.tag or 'latest'}"
        suffix = f":{self.tag}" if self.tag else ""
        return f"{self.transport}:{self.path}{suffix}"

    def skopeo(self) -> str:
        """The reference in skopeo's transport syntax."""
        if self.transport == "registry":
            return f"docker://{self.name()}"
        if self.transport == "oci-layout":
            return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")
        if self.transport == "docker-archive":
            return f"docker-archive:{self.path}"
        raise InvalidReferenceError(f"template {self.repository!r} is not pulled with skopeo")

    def with_digest(self, digest: str) -> ImageRef:
        return ImageRef(self.transport, self.registry, self.repository, None, digest, self.path)


def parse_reference(ref: str, templates: frozenset[str] = frozenset()) -> ImageRef:
    """Parse `ref`; a bare name in `templates` resolves to that template."""
    ref = ref.strip()
    if not ref:
        raise InvalidReferenceError("empty image reference: pass e.g. 'python' or 'alpine:3.20'")
    if len(ref) > 4096 or any(c.isspace() or ord(c) < 32 for c in ref):
        raise InvalidReferenceError(
            f"invalid image reference {ref[:80]!r}: contains whitespace "
            "or control characters, or is too long"
        )
    if ref.startswith("template:"):
        name = ref.removeprefix("template:")
        if not _TEMPLATE_NAME.match(name):
            raise InvalidReferenceError(
                f"invalid template name {name!r}: use lowercase letters, digits, '-' and '_'"
            )
        return ImageRef("template", repository=name)
    if ref in templates:
        return ImageRef("template", repository=ref)
    if ref.startswith("oci-layout:") or ref.startswith("oci:"):
        rest = ref.split(":", 1)[1]
        path, tag = rest, None
        head, sep, tail = rest.rpartition(":")
        if sep and "/" not in tail:
            path, tag = head, tail
        if not path.startswith("/"):
            raise InvalidReferenceError(
                f"OCI layout path must be absolute in {ref!r}: write oci-layout:/abs/path[:tag]"
            )
        if tag is not None and not _TAG.match(tag):
            raise InvalidReferenceError(f"invalid tag {tag!r} in {ref!r}")
        return ImageRef("oci-layout", path=Path(path), tag=tag)
    if ref.startswith("docker-archive:"):
        path = ref.removeprefix("docker-archive:")
        if not path.startswith("/"):
            raise InvalidReferenceError(
                f"archive path must be absolute in {ref!r}: write docker-archive:/abs/path.tar"
            )
        return ImageRef("docker-archive", path=Path(path))
    return _parse_registry(ref.removeprefix("docker://"))


def _parse_registry(ref: str) -> ImageRef:
    digest: str | None = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidReferenceError(
                f"invalid digest {digest!r}: expected 'sha256:' followed by 64 lowercase hex digits"
            )
    tag: str | None = None
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        ref, tag = ref.rsplit(":", 1)
        if not _TAG.match(tag):
            raise InvalidReferenceError(
                f"invalid tag {tag!r}: use letters, digits, '_', '.', '-' (at most 128)"
            )
    parts = ref.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        registry, repo_parts = first, parts[1:]
        if not _HOST.match(registry):
            raise InvalidReferenceError(f"invalid registry host {registry!r}")
        _check_port(registry)
    else:
        registry, repo_parts = DEFAULT_REGISTRY, parts
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and len(repo_parts) == 1:
        repo_parts = ["library", *repo_parts]
    for comp in repo_parts:
        if not _COMPONENT.match(comp):
            raise InvalidReferenceError(
                f"invalid repository name component {comp!r} in {ref!r}: use lowercase letters, "
                "digits and separators '.', '_', '-'"
            )
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(
        "registry", registry=registry, repository="/".join(repo_parts), tag=tag, digest=digest
    )


def _check_port(registry: str) -> None:
    """A port is 1-65535: a larger one reached getaddrinfo, which overflowed (a 500)."""
    _, colon, port = registry.rpartition("]")[2].rpartition(":")
    if colon and not 1 <= int(port) <= 65535:
        raise InvalidReferenceError(
            f"invalid registry host {registry!r}: port {port} is not in 1-65535"
        )
