"""Image store errors → API errors (shared by sandbox creation and image pulls)."""

from __future__ import annotations

from isorun.daemon.errors import ApiError, Forbidden, NotFound
from isorun.daemon.store import LOCAL_TENANT
from isorun.images import (
    ImageError,
    ImageNotFoundError,
    InvalidReferenceError,
    RegistryUnreachableError,
    TemplateError,
)
from isorun.images.reference import ImageRef

# Transports that read a path on the daemon's host: the (root) daemon would import any file it
# can read, so only the host's own administrator may name one.
HOST_PATH_TRANSPORTS = frozenset({"oci-layout", "docker-archive"})


def refuse_host_path_image(tenant: str, ref: str, parsed: ImageRef) -> None:
    """Raise Forbidden if an API-key tenant names an image by a path on the daemon's host."""
    if tenant != LOCAL_TENANT and parsed.transport in HOST_PATH_TRANSPORTS:
        raise Forbidden(
            f"image {ref!r}: the {parsed.transport!r} transport reads a path on the daemon's "
            "host and is for the local administrator (on the daemon's unix socket), not for "
            "an API key; push the image to a registry instead"
        )


def names_for(tenant: str, names: tuple[str, ...] | list[str]) -> list[str]:
    """The names of a stored image a tenant may see: not the host paths the local
    administrator imported it from (they name files on the daemon's host)."""
    if tenant == LOCAL_TENANT:
        return list(names)
    return [n for n in names if n.partition(":")[0] not in HOST_PATH_TRANSPORTS | {"oci"}]


def image_api_error(ref: str, exc: ImageError) -> ApiError:
    if isinstance(exc, ImageNotFoundError):
        return NotFound(f"image {ref!r} not found: {exc}")
    if isinstance(exc, InvalidReferenceError | TemplateError):
        return ApiError(f"invalid image {ref!r}: {exc}", code="invalid_image")
    if isinstance(exc, RegistryUnreachableError):
        return ApiError(str(exc), status=502, code="registry_unreachable")
    return ApiError(f"image {ref!r}: {exc}", status=422, code="image_error")
