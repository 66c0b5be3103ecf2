"""The HTTP API (Starlette): its system and sandbox routes, and the app that joins them to
those of processes, files and images (routes_*.py, sharing api.Api). JSON in and out; exec
and process output stream as NDJSON.

Auth: callers on the unix socket (restricted to root by its file mode) are the local
tenant unless they present a key; TCP callers must present `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from isorun import __version__
from isorun.daemon.api import SANDBOX, Api
from isorun.daemon.config import DaemonConfig
from isorun.daemon.errors import ApiError
from isorun.daemon.http import error_response, only_params, parse, query_flag
from isorun.daemon.models import CreateSandbox, SetTimeout
from isorun.daemon.progress import ProgressFeed
from isorun.daemon.routes_files import file_routes
from isorun.daemon.routes_images import image_routes
from isorun.daemon.routes_processes import process_routes
from isorun.daemon.sandboxes import CONSOLE_KEPT, SandboxManager
from isorun.daemon.store import Store
from isorun.errors import GuestError


def create_app(cfg: DaemonConfig, store: Store, manager: SandboxManager) -> Starlette:
    api = Api(cfg, store, manager)

    # --- system ------------------------------------------------------------------------

    async def health(request: Request, tenant: str) -> Any:
        # how often a silent NDJSON stream carries a keepalive: clients time streams by it
        return {"ok": True, "version": __version__, "stream_keepalive_s": cfg.stream_keepalive_s}

    async def openapi(request: Request, tenant: str) -> Any:
        from isorun.daemon.openapi import build_spec

        return build_spec()

    async def info(request: Request, tenant: str) -> Any:
        vcpus, memory_mib = manager.allocated()  # as the capacity check counts them
        return {
            "version": __version__,
            "tenant": tenant,
            "capacity": {
                "host_cpus": cfg.host_cpus,
                "host_mem_mib": cfg.host_mem_mib,
                "cpu_overcommit": cfg.cpu_overcommit,
                "mem_overcommit": cfg.mem_overcommit,
                "vcpus_allocated": vcpus,
                "memory_mib_allocated": memory_mib,
            },
            "price_per_vcpu_hour": cfg.price_per_vcpu_hour,
        }

    # --- sandboxes ---------------------------------------------------------------------

    async def create_sandbox(request: Request, tenant: str) -> Any:
        only_params(request, "progress")
        req = await parse(request, CreateSandbox)
        # A sandbox whose id never reached its client (it gave up, timed out or was
        # interrupted while the image was built or the VM booted) is not left running, unowned,
        # until its timeout: it is destroyed at once (end_reason "abandoned").
        if not query_flag(request, "progress"):
            row = await manager.create(tenant, req)
            if await request.is_disconnected():
                await manager.abandon(row.id)
            return row.public()

        # ?progress=1: NDJSON progress of the image pull/build and the boot, then the sandbox.
        # The pull/build runs on when the client goes away (it fills the cache); the VM not.
        # What is refused before any work is a plain error, not a 200 stream of one.
        manager.check_create(tenant, req)

        async def work(feed: ProgressFeed) -> dict[str, Any]:
            row = await manager.create(tenant, req, on_progress=feed.push)
            if feed.detached:
                await manager.abandon(row.id)
            return {"type": "sandbox", "sandbox": row.public()}

        return api.progress_stream(work)

    async def list_sandboxes(request: Request, tenant: str) -> Any:
        meta: dict[str, str] = {}
        for k, v in request.query_params.multi_items():
            if k.startswith("metadata."):
                meta[k[len("metadata.") :]] = v
            elif k == "metadata":
                key, sep, val = v.partition("=")
                if not sep:
                    raise ApiError("metadata filter must be 'key=value'", code="invalid")
                meta[key] = val
            elif k != "all":
                raise ApiError(
                    f"unknown query parameter {k!r}; use metadata.KEY=VALUE or all=1",
                    code="invalid",
                )
        include_ended = query_flag(request, "all")
        rows = manager.list(tenant, meta, include_ended)
        return {"sandboxes": [r.public() for r in rows]}

    async def get_sandbox(request: Request, tenant: str) -> Any:
        return manager.row(tenant, request.path_params["sid"]).public()

    async def kill_sandbox(request: Request, tenant: str) -> Any:
        return await manager.kill(tenant, request.path_params["sid"])

    async def set_timeout(request: Request, tenant: str) -> Any:
        req = await parse(request, SetTimeout)
        return manager.set_timeout(tenant, request.path_params["sid"], req.sandbox_timeout).public()

    async def logs(request: Request, tenant: str) -> Any:
        sid = request.path_params["sid"]
        manager.row(tenant, sid)
        live = manager.live.get(sid)
        # an ended sandbox's is what was kept when it ended: why it died is often there
        text = (
            live.vm.console.tail(CONSOLE_KEPT) if live is not None else manager.store.console(sid)
        )
        return Response(text, media_type="text/plain; charset=utf-8")

    async def metrics(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        u = live.vm.usage()
        host = {"cpu_ms": u.cpu_ms, "mem_peak_bytes": u.mem_peak_bytes, "uptime_ms": u.uptime_ms}
        try:
            guest = await live.vm.agent.metrics()
        except GuestError as exc:
            # The host's figures never depend on the guest, which may have broken its /proc
            if exc.code == "unresponsive":
                raise
            return {**host, "guest": None, "guest_error": str(exc)}
        return {**host, "guest": guest}

    routes = [
        Route("/v1/health", api.endpoint(health, public=True)),
        Route("/openapi.json", api.endpoint(openapi, public=True)),
        Route("/v1/info", api.endpoint(info)),
        Route("/v1/sandboxes", api.endpoint(create_sandbox, status=201), methods=["POST"]),
        Route("/v1/sandboxes", api.endpoint(list_sandboxes), methods=["GET"]),
        Route(SANDBOX, api.endpoint(get_sandbox), methods=["GET"]),
        Route(SANDBOX, api.endpoint(kill_sandbox), methods=["DELETE"]),
        Route(SANDBOX + "/timeout", api.endpoint(set_timeout), methods=["POST"]),
        Route(SANDBOX + "/logs", api.endpoint(logs), methods=["GET"]),
        Route(SANDBOX + "/metrics", api.endpoint(metrics), methods=["GET"]),
        *process_routes(api),
        *file_routes(api),
        *image_routes(api),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await manager.start()
        try:
            yield
        finally:
            for t in list(api.background):
                t.cancel()
            await asyncio.gather(*api.background, return_exceptions=True)
            await manager.stop()

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, "not_found", f"no route {request.method} {request.url.path}")

    async def bad_method(request: Request, exc: Exception) -> Response:
        return error_response(
            405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
        )

    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: bad_method}
    )
