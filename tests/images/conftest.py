"""Image test fixtures live in imghelpers.py (a unique module name, so test files can import
helpers from it without clashing with other suites' conftest modules)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from imghelpers import (
    auth_registry,
    base_image,
    public_registries,
    pytest_configure,
    pytest_runtest_setup,
    registry,
    store,
    template_store,
)

__all__ = [
    "auth_registry",
    "base_image",
    "public_registries",
    "pytest_configure",
    "pytest_runtest_setup",
    "registry",
    "store",
    "template_store",
]
