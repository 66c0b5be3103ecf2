"""Image-pull test support for the daemon, SDK and CLI suites: the loopback registry fixture
and image builders come from tests/images (imghelpers, ocibuild), reused here, not copied."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "images"))

import ocibuild as ob
from imghelpers import Registry, auth_registry, registry

__all__ = ["Registry", "auth_registry", "fold_phases", "ob", "push_busybox", "registry"]


def push_busybox(reg: Registry, tmp: Path, repo_tag: str, marker: str = "") -> str:
    """Push a bootable busybox image (with /etc/marker = `marker`); returns its digest."""
    lay = ob.Layout(tmp / repo_tag.replace("/", "_").replace(":", "_"))
    extra = [ob.file("etc/marker", marker)] if marker else []
    lay.tag(lay.manifest([ob.busybox_tree(extra)]), "v1")
    return reg.push(f"oci:{lay.path}:v1", repo_tag)


def fold_phases(records: Iterable[Any]) -> list[str]:
    """Progress phases in order; repeated `pulling` byte updates folded into one."""
    out: list[str] = []
    for r in records:
        phase = r["phase"] if isinstance(r, dict) else r.phase
        if not out or out[-1] != phase:
            out.append(phase)
    return out
