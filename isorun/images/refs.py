"""Names → digests (`refs.json`), rewritten atomically under a lock."""

from __future__ import annotations

import json
import os
from pathlib import Path

from isorun.images.locks import file_lock


class Refs:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_suffix(".lock")

    def read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            # A torn file cannot happen (we rename into place); a hand-edited broken one
            # loses only names, never images: digests still resolve.
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def _write(self, refs: dict[str, str]) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(refs, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    async def set(self, name: str, digest: str) -> None:
        async with file_lock(self.lock_path):
            refs = self.read()
            if refs.get(name) != digest:
                refs[name] = digest
                self._write(refs)

    async def drop_digest(self, digest: str) -> list[str]:
        async with file_lock(self.lock_path):
            refs = self.read()
            gone = [n for n, d in refs.items() if d == digest]
            if gone:
                self._write({n: d for n, d in refs.items() if d != digest})
            return gone

    def names_of(self, digest: str) -> list[str]:
        return sorted(n for n, d in self.read().items() if d == digest)
