"""`Images` / `AsyncImages`: the daemon's image store (list, pull with progress, inspect,
remove, gc, disk usage)."""

from __future__ import annotations

from typing import Any, Literal

import anyio

from isorun.sdk import _core, _daemon
from isorun.sdk._callbacks import run_pending
from isorun.sdk._progress import ProgressCallback, ProgressDecoder
from isorun.sdk.sandbox_async import _client as _async_client
from isorun.sdk.sandbox_sync import _client as _sync_client

PullPolicy = Literal["missing", "always"]


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
            return list(_core.check(c.get("/v1/images"))["images"])

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
            if r.status_code >= 300:
                r.read()
                _core.check(r)
            for line in r.iter_lines():
                dec.feed(line)
        return dec.result("image")

    def inspect(self, image: str) -> dict[str, Any]:
        """Digest, names, size, `in_use` and the image config of a stored image."""
        _daemon.ensure_daemon(self._settings)
        with _sync_client(self._settings) as c:
            return dict(_core.check(c.get("/v1/images/inspect", params={"ref": image})))

    def remove(self, image: str) -> dict[str, Any]:
        """Remove a stored image; refused (409) while a sandbox uses it. Local admin only."""
        _daemon.ensure_daemon(self._settings)
        with _sync_client(self._settings) as c:
            return dict(_core.check(c.delete("/v1/images", params={"ref": image})))

    def gc(self, *, all_unused: bool = False) -> dict[str, Any]:
        """Delete unused unnamed images (every unused one with all_unused). Local admin only."""
        _daemon.ensure_daemon(self._settings)
        with _sync_client(self._settings) as c:
            params = {"all": "1"} if all_unused else {}
            return dict(_core.check(c.post("/v1/images/gc", params=params)))

    def disk_usage(self) -> dict[str, Any]:
        _daemon.ensure_daemon(self._settings)
        with _sync_client(self._settings) as c:
            return dict(_core.check(c.get("/v1/images/usage")))


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
            return list(_core.check(await c.get("/v1/images"))["images"])

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
            if r.status_code >= 300:
                await r.aread()
                _core.check(r)
            async for line in r.aiter_lines():
                dec.feed(line)
                await run_pending(dec.pending)
        return dec.result("image")

    async def inspect(self, image: str) -> dict[str, Any]:
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
        async with _async_client(self._settings) as c:
            r = await c.get("/v1/images/inspect", params={"ref": image})
            return dict(_core.check(r))

    async def remove(self, image: str) -> dict[str, Any]:
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
        async with _async_client(self._settings) as c:
            return dict(_core.check(await c.delete("/v1/images", params={"ref": image})))

    async def gc(self, *, all_unused: bool = False) -> dict[str, Any]:
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
        async with _async_client(self._settings) as c:
            params = {"all": "1"} if all_unused else {}
            return dict(_core.check(await c.post("/v1/images/gc", params=params)))

    async def disk_usage(self) -> dict[str, Any]:
        await anyio.to_thread.run_sync(_daemon.ensure_daemon, self._settings)
        async with _async_client(self._settings) as c:
            return dict(_core.check(await c.get("/v1/images/usage")))
