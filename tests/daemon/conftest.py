from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemonfixtures import api, daemon, image
from daemonhelpers import Daemon

__all__ = ["api", "daemon", "image"]


@pytest.fixture(scope="module")
def sandbox(daemon: Daemon, image: str) -> str:
    """One running sandbox shared by a module's tests (boots are slow under TCG)."""
    with daemon.client() as c:
        r = c.post("/v1/sandboxes", json={"image": image, "metadata": {"suite": "daemon"}})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])
