"""Image store errors → API errors (shared by sandbox creation and image pulls)."""

from __future__ import annotations

from isorun.daemon.errors import ApiError, Forbidden, NotFound
from isorun.daemon.store import LOCAL_TENANT
from isorun.images import (
    ImageError,
    ImageNotFoundError,
    InvalidReferenceError,
    RegistryPolicy,
    RegistryRefusedError,
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


def pull_policy_for(tenant: str, tenant_registries: RegistryPolicy) -> RegistryPolicy | None:
    """Which registries a pull for `tenant` may reach: any for the local administrator (their
    own host), the operator's list for an API key (its pull must not reach the host's private
    network, nor spend the daemon's credentials on a registry the tenant chose)."""
    return None if tenant == LOCAL_TENANT else tenant_registries


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
    if isinstance(exc, RegistryRefusedError):
        return Forbidden(
            f"image {ref!r}: {exc}; the daemon's operator sets which registries API keys may "
            "pull from (isorund --tenant-registries / ISORUN_TENANT_REGISTRIES)",
            code="registry_refused",
        )
    if isinstance(exc, RegistryUnreachableError):
        return ApiError(str(exc), status=502, code="registry_unreachable")
    return ApiError(f"image {ref!r}: {exc}", status=422, code="image_error")
