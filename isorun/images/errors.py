"""Image errors. Each message names what is wrong and what to do about it."""

from __future__ import annotations

from isorun.errors import ConfigError, IsorunError


class ImageError(IsorunError):
    """Base of every error raised by `isorun.images`."""


class InvalidReferenceError(ImageError):
    """The image reference string cannot be parsed."""


class ImageNotFoundError(ImageError):
    """The registry (or layout/archive/template set) has no such image or tag."""


class RegistryUnreachableError(ImageError):
    """The registry could not be contacted (DNS, connection refused, TLS, timeout)."""


class RegistryRefusedError(ImageError):
    """The registry is not one this pull's policy lets it reach (registry_policy.py)."""


class RegistryAuthError(ImageError):
    """The registry refused our credentials, or needs some and we had none."""


class ImageCorruptError(ImageError):
    """A blob's digest does not match, or a layer is truncated or not a valid archive."""


class UnsafeLayerError(ImageError):
    """A layer tried to write outside the image root (e.g. a hard link to `../..`)."""


class UnsupportedImageError(ImageError):
    """The image is valid but cannot run here (no linux/amd64 variant, unknown media type)."""


class ImageTooLargeError(ImageError):
    """The image is larger than the store's configured size limit."""


class StoreFullError(ImageError):
    """The image store's disk filled up during conversion; nothing half-written was kept."""


class ImageInUseError(ImageError):
    """The image cannot be removed while a sandbox or snapshot holds it."""

    def __init__(self, message: str, holders: list[str]) -> None:
        super().__init__(message)
        self.holders = holders


class TemplateError(ImageError):
    """A template definition is invalid, unknown, or failed to build."""


class ToolMissingError(ImageError, ConfigError):
    """A host tool (skopeo, umoci, mkfs.ext4, mmdebstrap) is not installed."""


class ImageToolError(ImageError):
    """A conversion tool failed in a way we do not classify; the message holds its output."""
