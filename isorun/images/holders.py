"""Who uses which image: one empty file per holder under `holders/<digest-hex>/`.

Files (not a database) so that `acquire` is one atomic create, survives restarts, and a
crashed holder is visible and removable by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

from isorun.images.errors import ImageError

_HOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


def check_holder(holder_id: str) -> str:
    if not _HOLDER.match(holder_id):
        raise ImageError(
            f"invalid holder id {holder_id!r}: use 1-128 letters, digits and "
            "'_.:@-', starting with a letter or digit"
        )
    return holder_id


class Holders:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, hexd: str) -> Path:
        return self.root / hexd

    def add(self, hexd: str, holder_id: str) -> None:
        d = self._dir(hexd)
        d.mkdir(parents=True, exist_ok=True)
        (d / check_holder(holder_id)).touch()

    def remove(self, hexd: str, holder_id: str) -> bool:
        p = self._dir(hexd) / check_holder(holder_id)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self, hexd: str) -> list[str]:
        d = self._dir(hexd)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir())

    def clear(self, hexd: str) -> None:
        d = self._dir(hexd)
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
