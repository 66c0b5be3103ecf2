"""`Images` / `AsyncImages`: the daemon's image store (list, pull with progress, inspect,
remove, gc, disk usage)."""

from __future__ import annotations

from typing import Any, Literal

import anyio
import httpx

from isorun.sdk import _core, _daemon
from isorun.sdk._answers import shaped
from isorun.sdk._callbacks import run_pending
from isorun.sdk._progress import ProgressCallback, ProgressDecoder
from isorun.sdk.sandbox_async import _client as _async_client
from isorun.sdk.sandbox_sync import _client as _sync_client

PullPolicy = Literal["missing", "always"]


def _images(resp: httpx.Response) -> list[dict[str, Any]]:
    """The images of a GET /v1/images answer."""
    return [
        shaped(i, _core.asked(resp), "an image") for i in _core.answer(resp, images=list)["images"]
    ]


class Images:
    """`Images().pull("python", on_progress=print)` pulls or builds an image into the store."""

    def __init__(
        self,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        autostart: bool | None = None,
    ) -> None:
        self._settings = _daemon.resolve(api_url, api_key, autostart)

    def list(self) -> list[dict[str, Any]]:
        _daemon.ensure_daemon(self._settings)
        with _sync_client(self._settings) as c:
            return _images(c.get("/v1/images"))

    def pull(
        self,
        image: str,
        *,
        pull: PullPolicy = "missing",
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Pull (or build, for a template) `image`; returns {digest, names, size_bytes, ...}.
        `on_progress` gets a `PullProgress` per step as the daemon reports it."""
        _daemon.ensure_daemon(self._settings)
        dec = ProgressDecoder(on_progress)
        with (
            _sync_client(self._settings) as c,
            c.stream(
                "POST",
                "/v1/images/pull",
                json={"image": image, "pull": pull},
                timeout=c.ndjson_timeout(),
            ) as r,
        ):
            _core.refused(r)
            for line in _core.ndjson_lines(r):
                dec.feed(line)
        return dec.result("image")

    def inspect(self, image: str) -> dict[str, Any]:
        """Digest, names, size, `in_use` and the image config of a stored image."""
        _daemon.ensure_daemon(self._settings)
        with _sync_client(self._settings) as c:
            return _core.answer(c.get("/v1/images/inspect", params={"ref": image}))

    def remove(self, image: str) -> dict[str, Any]:
        """Remove a stored image; refused (409) while a sandbox uses it. Local admin only."""
        _daemon.ensure_daemon(self._settings)
        with _sync_client(self._settings) as c:
            return _core.answer(c.delete("/v1/images", params={"ref": image}))

    def gc(self, *, all_unused: bool = False) -> dict[str, Any]:
        """Delete unused unnamed images (every unused one with all_unused). Local admin only."""
        _daemon.ensure_daemon(self._settings)
        with _sync_client(self._settings) as c:
            params = {"all": "1"} if all_unused else {}
            return _core.answer(c.post("/v1/images/gc", params=params))

    def disk_usage(self) -> dict[str, Any]:
        _daemon.ensure_daemon(self._settings)
        with _sync_client(self._settings) as c:
            return _core.answer(c.get("/v1/images/usage"))


class AsyncImages:
    """The async face of `Images`."""

    def __init__(
        self,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        autostart: bool | None = None,
    ) -> None:
        self._settings = _daemon.resolve(api_url, api_key, autostart)

    async def list(self) -> list[dict[str, Any]]:
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
        async with _async_client(self._settings) as c:
            return _images(await c.get("/v1/images"))

    async def pull(
        self,
        image: str,
        *,
        pull: PullPolicy = "missing",
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
        dec = ProgressDecoder(on_progress, pending=[])
        async with (
            _async_client(self._settings) as c,
            c.stream(
                "POST",
                "/v1/images/pull",
                json={"image": image, "pull": pull},
                timeout=await c.ndjson_timeout(),
            ) as r,
        ):
            await _core.arefused(r)
            async for line in _core.andjson_lines(r):
                dec.feed(line)
                await run_pending(dec.pending)
        return dec.result("image")

    async def inspect(self, image: str) -> dict[str, Any]:
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
        async with _async_client(self._settings) as c:
            return _core.answer(await c.get("/v1/images/inspect", params={"ref": image}))

    async def remove(self, image: str) -> dict[str, Any]:
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
        async with _async_client(self._settings) as c:
            return _core.answer(await c.delete("/v1/images", params={"ref": image}))

    async def gc(self, *, all_unused: bool = False) -> dict[str, Any]:
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
        async with _async_client(self._settings) as c:
            params = {"all": "1"} if all_unused else {}
            return _core.answer(await c.post("/v1/images/gc", params=params))

    async def disk_usage(self) -> dict[str, Any]:
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
        async with _async_client(self._settings) as c:
            return _core.answer(await c.get("/v1/images/usage"))
