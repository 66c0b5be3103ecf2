from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "daemon"))

from daemonfixtures import api, daemon, image

__all__ = ["api", "daemon", "image"]
