"""OCI images and templates → read-only ext4 root filesystems, cached by digest.

store = ImageStore(root=Path("/var/lib/isorun/images"))
img = await store.ensure("python")        # or "alpine:3.20", "host:5000/x@sha256:…",
img.rootfs, img.digest, img.config        # "oci-layout:/dir:tag", "docker-archive:/x.tar"
"""

from isorun.images.config import Credentials, ImageConfig, StoreConfig
from isorun.images.errors import (
    ImageCorruptError,
    ImageError,
    ImageInUseError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageToolError,
    InvalidReferenceError,
    RegistryAuthError,
    RegistryRefusedError,
    RegistryUnreachableError,
    StoreFullError,
    TemplateError,
    ToolMissingError,
    UnsafeLayerError,
    UnsupportedImageError,
)
from isorun.images.progress import Progress, ProgressEvent
from isorun.images.reference import ImageRef, parse_reference
from isorun.images.registry_policy import RegistryPolicy
from isorun.images.store import DiskUsage, GcReport, Image, ImageStore, admits

__all__ = [
    "Credentials",
    "DiskUsage",
    "GcReport",
    "Image",
    "ImageConfig",
    "ImageCorruptError",
    "ImageError",
    "ImageInUseError",
    "ImageNotFoundError",
    "ImageRef",
    "ImageStore",
    "ImageTooLargeError",
    "ImageToolError",
    "InvalidReferenceError",
    "Progress",
    "ProgressEvent",
    "RegistryAuthError",
    "RegistryPolicy",
    "RegistryRefusedError",
    "RegistryUnreachableError",
    "StoreConfig",
    "StoreFullError",
    "TemplateError",
    "ToolMissingError",
    "UnsafeLayerError",
    "UnsupportedImageError",
    "admits",
    "parse_reference",
]
