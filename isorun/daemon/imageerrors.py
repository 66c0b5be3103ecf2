"""Image store errors → API errors (shared by sandbox creation and image pulls)."""

from __future__ import annotations

from isorun.daemon.errors import ApiError, NotFound
from isorun.images import (
    ImageError,
    ImageNotFoundError,
    InvalidReferenceError,
    RegistryUnreachableError,
    TemplateError,
)


def image_api_error(ref: str, exc: ImageError) -> ApiError:
    if isinstance(exc, ImageNotFoundError):
        return NotFound(f"image {ref!r} not found: {exc}")
    if isinstance(exc, InvalidReferenceError | TemplateError):
        return ApiError(f"invalid image {ref!r}: {exc}", code="invalid_image")
    if isinstance(exc, RegistryUnreachableError):
        return ApiError(str(exc), status=502, code="registry_unreachable")
    return ApiError(f"image {ref!r}: {exc}", status=422, code="image_error")
