"""Ends the state database refused (a full disk, another process holding its lock), written
down in the state dir, one small JSON file per sandbox: a daemon restarted before the
database took one stores it with its usage and reason, rather than calling the sandbox
lost. Best effort: the disk may be too full for the file as well."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("isorund")

HELD_ENDS_DIR = "held-ends"


@dataclass(frozen=True, slots=True)
class HeldRecord:
    reason: str
    usage: tuple[int, int, int]  # cpu_ms, mem_peak_bytes, uptime_ms
    error: str | None
    ended: float
    console: str


def _path(state_dir: Path, sandbox_id: str) -> Path:
    return state_dir / HELD_ENDS_DIR / f"{sandbox_id}.json"


def write(state_dir: Path, sandbox_id: str, record: HeldRecord) -> None:
    path = _path(state_dir, sandbox_id)
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            json.dump(asdict(record), f)
        tmp.replace(path)  # whole or not at all
    except OSError as exc:
        log.warning("the held end of sandbox %s is not kept across a restart: %s", sandbox_id, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


def forget(state_dir: Path, sandbox_id: str) -> None:
    with contextlib.suppress(OSError):
        _path(state_dir, sandbox_id).unlink()


def read_all(state_dir: Path) -> dict[str, HeldRecord]:
    """The ends a previous daemon held and wrote down, by sandbox id."""
    found: dict[str, HeldRecord] = {}
    with contextlib.suppress(OSError):
        for path in (state_dir / HELD_ENDS_DIR).glob("*.json"):
            record = _parse(path)
            if record is None:
                log.warning("ignoring the unreadable held end %s", path)
                continue
            found[path.stem] = record
    return found


def _parse(path: Path) -> HeldRecord | None:
    try:
        d = json.loads(path.read_text())
        cpu_ms, mem_peak, uptime_ms = (int(x) for x in d["usage"])
        error = d.get("error")
        return HeldRecord(
            reason=str(d["reason"]),
            usage=(cpu_ms, mem_peak, uptime_ms),
            error=str(error) if error is not None else None,
            ended=float(d["ended"]),
            console=str(d.get("console") or ""),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
