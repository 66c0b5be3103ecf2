"""Routes of a sandbox's files: read and write as byte streams, list, stat, mkdir, remove,
rename, and watch for changes (NDJSON)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from isorun.daemon.api import SANDBOX, Api
from isorun.daemon.http import (
    body_chunks,
    entry_record,
    error_record,
    parse,
    query_flag,
    query_int,
    query_mode,
    query_path,
)
from isorun.daemon.models import (
    MkdirOp,
    RemoveOp,
    RenameOp,
)
from isorun.daemon.rawstream import BrokenOff, RawStream
from isorun.errors import (
    IsorunError,
)

log = logging.getLogger("isorund.api")


def file_routes(api: Api) -> list[Route]:
    manager = api.manager

    async def read_file(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        path = query_path(request)
        it = live.vm.agent.read_file(path)
        # Pull the first chunk now so a missing file is a 404, not a broken stream.
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = b""

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            try:
                if first:
                    yield first
                    sent = len(first)
                async for chunk in it:
                    yield chunk
                    sent += len(chunk)
            except IsorunError as exc:
                # a lost connection: have its sandbox's end (and why) recorded before the client,
                # seeing its download cut short, asks what became of the sandbox
                why = await manager.explain(live.row.id, exc)
                log.warning(
                    "GET files %s of sandbox %s broken off after %d bytes: %s",
                    path,
                    live.row.id,
                    sent,
                    why,
                )
                raise BrokenOff from exc
            finally:
                await it.aclose()

        return RawStream(body())

    async def head_file(request: Request, tenant: str) -> Any:
        """GET's status and headers without its body: the guest opens the file as for a
        read (the same errors) and sends none of it. Content-Length only when the guest
        says the file has bytes: a device or a /proc file reads as size 0 and is not."""
        live = manager.get_live(tenant, request.path_params["sid"])
        size = await live.vm.agent.file_size(query_path(request))
        if size:
            return Response(media_type=RawStream.media_type, headers={"content-length": str(size)})
        return StreamingResponse(iter(()), media_type=RawStream.media_type)  # chunked, as GET

    async def write_file(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        path = query_path(request, "mode", "append")
        # absent: an existing file keeps its mode, a new one gets 0644 (docs/protocol.md)
        mode = None if "mode" not in request.query_params else query_mode(request)
        append = query_flag(request, "append")
        n = await live.vm.agent.write_file(path, body_chunks(request), mode=mode, append=append)
        return {"path": path, "bytes": n}

    async def list_files(request: Request, tenant: str) -> Any:
        path, depth = query_path(request, "depth"), query_int(request, "depth", 1, 1, 64)
        live = manager.get_live(tenant, request.path_params["sid"])
        entries = await live.vm.agent.list(path, depth)
        return {"entries": [entry_record(e) for e in entries]}

    async def stat_file(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        return entry_record(await live.vm.agent.stat(query_path(request)))

    async def mkdir(request: Request, tenant: str) -> Any:
        req = await parse(request, MkdirOp)
        live = manager.get_live(tenant, request.path_params["sid"])
        await live.vm.agent.mkdir(req.path, req.parents, req.mode)
        return {"ok": True}

    async def remove(request: Request, tenant: str) -> Any:
        req = await parse(request, RemoveOp)
        live = manager.get_live(tenant, request.path_params["sid"])
        await live.vm.agent.remove(req.path, req.recursive)
        return {"ok": True}

    async def rename(request: Request, tenant: str) -> Any:
        req = await parse(request, RenameOp)
        live = manager.get_live(tenant, request.path_params["sid"])
        await live.vm.agent.rename(req.src, req.dst)
        return {"ok": True}

    async def watch(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        path = query_path(request, "recursive")
        recursive = query_flag(request, "recursive")
        # An agent from before watch_ready says nothing until a change, so a missing or
        # relative path would only show as an error record later: check it first (a newer
        # agent's open_watch fails for it itself).
        if "watch_ready" not in live.vm.agent.conn.features:
            await live.vm.agent.stat(path)
        # The response starts once the guest watches: a change the caller makes after its
        # 200 (the SDK's watch() returns at it) is reported.
        w = await live.vm.agent.open_watch(path, recursive)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for op, p in w:
                    yield (json.dumps({"type": "fs", "op": op, "path": p}) + "\n").encode()
            except IsorunError as exc:
                why = await manager.explain(live.row.id, exc)
                yield (json.dumps(error_record(why)) + "\n").encode()
            finally:
                w.close()

        return api.ndjson(body())

    return [
        Route(SANDBOX + "/files", api.endpoint(read_file, head=head_file), methods=["GET"]),
        Route(SANDBOX + "/files", api.endpoint(write_file), methods=["PUT"]),
        Route(SANDBOX + "/files/list", api.endpoint(list_files), methods=["GET"]),
        Route(SANDBOX + "/files/stat", api.endpoint(stat_file), methods=["GET"]),
        Route(SANDBOX + "/files/watch", api.endpoint(watch, streams=True), methods=["GET"]),
        Route(SANDBOX + "/files/mkdir", api.endpoint(mkdir), methods=["POST"]),
        Route(SANDBOX + "/files/remove", api.endpoint(remove), methods=["POST"]),
        Route(SANDBOX + "/files/rename", api.endpoint(rename), methods=["POST"]),
    ]
