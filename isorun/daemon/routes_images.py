"""Routes of the daemon's account and store: usage, images (list, pull, inspect, remove,
gc, disk usage) and API keys."""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from isorun.daemon import auth
from isorun.daemon.api import Api
from isorun.daemon.errors import ApiError, Conflict, NotFound
from isorun.daemon.http import (
    image_json,
    only_params,
    parse,
    query_flag,
)
from isorun.daemon.imageerrors import (
    image_api_error,
    names_for,
    pull_policy_for,
    refuse_host_path_image,
)
from isorun.daemon.models import (
    CreateKey,
    PullImage,
)
from isorun.daemon.progress import ProgressFeed, progress_record
from isorun.images import Image, ImageError, ImageInUseError, ProgressEvent, admits


def image_routes(api: Api) -> list[Route]:
    manager, store, cfg = api.manager, api.store, api.cfg

    async def usage(request: Request, tenant: str) -> Any:
        only_params(request, "since", "until")

        def f(name: str) -> float | None:
            raw = request.query_params.get(name)
            if raw is None:
                return None
            try:
                v = float(raw)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):  # float() takes nan and inf, which match no record
                raise ApiError(f"{name}={raw!r} must be a unix timestamp", code="invalid")
            return v

        return {
            "price_per_vcpu_hour": cfg.price_per_vcpu_hour,
            **store.usage(tenant, f("since"), f("until")),
        }

    def tenant_image_json(tenant: str, img: Image) -> dict[str, Any] | None:
        """What a tenant is shown of a stored image: None for one known only by the host
        paths it was imported from, or one it could not be handed (the daemon's credentials
        may have fetched it from a registry the tenant may not name)."""
        if (img.names and not names_for(tenant, img.names)) or not admits(
            pull_policy_for(tenant, cfg.tenant_registries), img
        ):
            return None
        return without_host_paths(tenant, img)

    def without_host_paths(tenant: str, img: Image) -> dict[str, Any]:
        """An image's JSON without the host paths it was imported from, for a tenant: its
        names, and its `source` (null when that was one)."""
        source = img.source if names_for(tenant, [img.source]) else None
        return {**image_json(img), "names": names_for(tenant, img.names), "source": source}

    async def images(request: Request, tenant: str) -> Any:
        shown = (tenant_image_json(tenant, i) for i in manager.images.list())
        return {"images": [i for i in shown if i is not None]}

    def _image_ref(request: Request) -> str:
        ref = request.query_params.get("ref", "")
        if not ref or len(ref) > 1024:
            raise ApiError(
                "give the image as ?ref=NAME (at most 1024 characters)", status=400, code="invalid"
            )
        return ref

    async def inspect_image(request: Request, tenant: str) -> Any:
        ref = _image_ref(request)
        try:
            refuse_host_path_image(tenant, ref, manager.images.parse(ref))
            img = manager.images.inspect(ref)
        except ImageError as exc:
            raise image_api_error(ref, exc) from exc
        shown = tenant_image_json(tenant, img)
        if shown is None:
            raise NotFound(f"image {ref!r} not found")
        c = img.config
        # Holders are other tenants' sandboxes: say only whether the image is in use.
        return {
            **shown,
            "in_use": bool(manager.images.holders(img.digest)),
            "config": {
                "env": c.env,
                "working_dir": c.working_dir,
                "user": c.user,
                "entrypoint": c.entrypoint,
                "cmd": c.cmd,
            },
        }

    async def remove_image(request: Request, tenant: str) -> Any:
        api.admin(tenant, "removing images")
        ref = _image_ref(request)
        try:
            img = await manager.images.remove(ref)
        except ImageInUseError as exc:
            raise Conflict(f"image {ref!r} is in use: {exc}", code="image_in_use") from exc
        except ImageError as exc:
            raise image_api_error(ref, exc) from exc
        return {"removed": img.digest, "freed_bytes": img.disk_bytes}

    async def gc_images(request: Request, tenant: str) -> Any:
        api.admin(tenant, "garbage-collecting images")
        all_unused = query_flag(request, "all")
        report = await manager.images.gc(all_unused=all_unused)
        return {"removed": report.removed, "freed_bytes": report.freed_bytes}

    async def images_disk_usage(request: Request, tenant: str) -> Any:
        api.admin(tenant, "seeing the image store's disk usage")
        du = manager.images.disk_usage()
        return {"images": du.images, "image_bytes": du.image_bytes, "tmp_bytes": du.tmp_bytes}

    async def pull_image(request: Request, tenant: str) -> Any:
        req = await parse(request, PullImage)
        try:
            parsed = manager.images.parse(req.image)  # a malformed reference is a plain 400
        except ImageError as exc:
            raise image_api_error(req.image, exc) from exc
        refuse_host_path_image(tenant, req.image, parsed)

        async def work(feed: ProgressFeed) -> dict[str, Any]:
            def progress(ev: ProgressEvent) -> None:
                feed.push(progress_record(ev))

            try:
                img = await manager.images.ensure(
                    req.image,
                    pull=req.pull,
                    progress=progress,
                    policy=pull_policy_for(tenant, cfg.tenant_registries),
                )
            except ImageError as exc:
                raise image_api_error(req.image, exc) from exc
            # the same image the administrator imported from a host path: not its path
            return {"type": "image", "image": without_host_paths(tenant, img)}

        return api.progress_stream(work)

    async def create_key(request: Request, tenant: str) -> Any:
        api.admin(tenant, "managing API keys")
        req = await parse(request, CreateKey)
        return auth.create_key(store, req.tenant_id, req.name)

    async def list_keys(request: Request, tenant: str) -> Any:
        api.admin(tenant, "managing API keys")
        return {"keys": store.list_keys()}

    async def revoke_key(request: Request, tenant: str) -> Any:
        api.admin(tenant, "managing API keys")
        if not store.revoke_key(request.path_params["kid"]):
            raise NotFound(f"API key {request.path_params['kid']!r} not found")
        return {"ok": True}

    return [
        Route("/v1/usage", api.endpoint(usage), methods=["GET"]),
        Route("/v1/images", api.endpoint(images), methods=["GET"]),
        Route("/v1/images/pull", api.endpoint(pull_image), methods=["POST"]),
        Route("/v1/images/inspect", api.endpoint(inspect_image), methods=["GET"]),
        Route("/v1/images", api.endpoint(remove_image), methods=["DELETE"]),
        Route("/v1/images/gc", api.endpoint(gc_images), methods=["POST"]),
        Route("/v1/images/usage", api.endpoint(images_disk_usage), methods=["GET"]),
        Route("/v1/keys", api.endpoint(create_key, status=201), methods=["POST"]),
        Route("/v1/keys", api.endpoint(list_keys), methods=["GET"]),
        Route("/v1/keys/{kid}", api.endpoint(revoke_key), methods=["DELETE"]),
    ]
