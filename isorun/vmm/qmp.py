"""QMP monitor of one QEMU: commands, and the SHUTDOWN event that tells how a guest ended.

Built on qemu.qmp, the QEMU project's own asyncio QMP library.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError

from isorun.errors import VMError


class QMPMonitor:
    def __init__(self) -> None:
        self._client = QMPClient("isorun")
        # qemu.qmp's default listener takes every event and keeps it (queue and history)
        # until read; nobody reads it here, and a guest can cause events for as long as it
        # lives (RTC_CHANGE, VSERPORT_CHANGE): host memory would grow without end. It cannot
        # be removed, so it accepts nothing; the events we want have their own listener.
        self._client.events.event_filter = _no_event
        self._events: EventListener | None = None
        self._event_task: asyncio.Task[None] | None = None
        self._accepted: set[str] = set()
        self.shutdown_reason: str | None = None
        self.panicked = False

    async def connect(self, path: Path) -> None:
        try:
            await self._client.connect(str(path))
        except Exception as exc:  # QEMU may be the guest's by now: any reply may be hostile
            raise VMError(f"cannot connect to QEMU's QMP socket {path}: {exc!r}", "qmp") from exc
        # Each of the two events is taken once: the listener keeps all it takes, and a
        # hostile QEMU could send them without end.
        self._events = EventListener(event_filter=self._first_of_each)
        self._client.register_listener(self._events)
        self._event_task = asyncio.create_task(self._watch(), name="qmp-events")

    async def _watch(self) -> None:
        assert self._events is not None
        async for event in self._events:
            raw = event.get("data")
            data: dict[str, Any] = raw if isinstance(raw, dict) else {}
            if event["event"] == "GUEST_PANICKED":
                self.panicked = True
                self.shutdown_reason = "guest-panic"
            elif event["event"] == "SHUTDOWN" and not self.panicked:
                reason = data.get("reason")
                self.shutdown_reason = reason if isinstance(reason, str) else "unknown"

    def _first_of_each(self, event: Any) -> bool:
        try:  # a qemu.qmp Message: a mapping, not a dict
            name = event["event"]
        except (KeyError, TypeError):
            return False
        if name in ("SHUTDOWN", "GUEST_PANICKED") and name not in self._accepted:
            self._accepted.add(name)
            return True
        return False

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self._client.execute(cmd, args)
        except (QMPError, OSError) as exc:
            raise VMError(f"QMP command '{cmd}' failed: {exc}", "qmp") from exc

    async def status(self) -> str:
        """The run state (`query-status`), checked: QEMU's answers are not trusted."""
        answer = await self.execute("query-status")
        status = answer.get("status") if isinstance(answer, dict) else None
        if not isinstance(status, str):
            raise VMError(f"QMP query-status answered {str(answer)[:200]}", "qmp")
        return status

    async def close(self) -> None:
        if self._event_task is not None:
            self._event_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._event_task
        if self._events is not None:
            with contextlib.suppress(Exception):
                self._client.remove_listener(self._events)
        with contextlib.suppress(Exception):
            await self._client.disconnect()


def _no_event(_event: Any) -> bool:
    return False
