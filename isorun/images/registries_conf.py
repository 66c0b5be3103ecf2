"""Credential helpers set in containers-registries.conf(5): skopeo asks them for any
registry's credentials, beside and whatever the auth file it is given."""

from __future__ import annotations

import contextlib
import os
import tomllib
from pathlib import Path

# the reserved name that stands for the auth files (containers-auth.json(5)), the default
AUTH_FILES_HELPER = "containers-auth.json"


def config_files() -> list[Path]:
    """Every registries.conf and drop-in skopeo may read, whether or not it exists: the
    user's (~/.config, by $HOME: containers/image does not look at XDG_CONFIG_HOME for it,
    though it counts here too), the system's, and their .d dirs; and the file podman and
    buildah take from $CONTAINERS_REGISTRIES_CONF (skopeo 1.9 does not)."""
    mains = [
        Path.home() / ".config" / "containers" / "registries.conf",
        Path("/etc/containers/registries.conf"),
    ]
    if xdg := os.environ.get("XDG_CONFIG_HOME"):
        mains.append(Path(xdg) / "containers" / "registries.conf")
    if env := os.environ.get("CONTAINERS_REGISTRIES_CONF"):
        mains.append(Path(env))
    files = list(mains)
    for main in mains:
        with contextlib.suppress(OSError):
            files += sorted(p for p in Path(f"{main}.d").iterdir() if p.suffix == ".conf")
    return files


def credential_helpers_set() -> bool:
    """Whether any of them sets a credential helper other than the auth files. One that is
    there but unreadable to us, or not TOML, counts: skopeo may read it (it is the operator's
    to fix), and being wrong this way only keeps an image to the tenant that pulled it."""
    for path in config_files():
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return True
        helpers = doc.get("credential-helpers", [])
        if not isinstance(helpers, list) or any(h != AUTH_FILES_HELPER for h in helpers):
            return True
    return False
