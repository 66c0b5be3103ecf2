"""What every route of the HTTP API shares: the daemon's parts, authentication, the
wrapper that maps a handler's errors, and NDJSON streaming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from isorun.daemon import auth
from isorun.daemon.config import DaemonConfig
from isorun.daemon.errors import Forbidden, Unauthorized
from isorun.daemon.http import (
    NDJSON,
    Handler,
    JSONText,
    error_record,
    error_response,
    map_error,
    stream_error_record,
)
from isorun.daemon.keepalive import with_keepalives
from isorun.daemon.progress import ProgressFeed
from isorun.daemon.sandboxes import SandboxManager
from isorun.daemon.stdin import StdinPipes
from isorun.daemon.store import LOCAL_TENANT, Store

# Where a sandbox's routes start.
SANDBOX = "/v1/sandboxes/{sid}"


class Api:
    """The daemon's parts as its routes use them (each route module takes one)."""

    def __init__(self, cfg: DaemonConfig, store: Store, manager: SandboxManager) -> None:
        self.cfg, self.store, self.manager = cfg, store, manager
        self.pipes = StdinPipes(store)
        # Pulls and streamed creates run on when their client goes away; stopped with the
        # daemon.
        self.background: set[asyncio.Task[Any]] = set()

    def ndjson(self, lines: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(
            with_keepalives(lines, self.cfg.stream_keepalive_s), media_type=NDJSON
        )

    def progress_stream(
        self,
        work: Callable[[ProgressFeed], Awaitable[dict[str, Any]]],
    ) -> StreamingResponse:
        """Run `work` as a daemon task; stream its progress records, then its final record."""
        feed = ProgressFeed()

        async def runner() -> None:
            try:
                feed.push(await work(feed))
            except asyncio.CancelledError:
                feed.push(
                    stream_error_record(
                        503, "daemon_stopping", "the daemon stopped before this finished; retry"
                    )
                )
                raise
            except Exception as exc:
                feed.push(error_record(exc))
            finally:
                feed.close()

        task = asyncio.create_task(runner())
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return self.ndjson(feed.lines())

    def tenant_of(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        local = _on_the_unix_socket(request.scope)
        if header:
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthorized("Authorization header must be 'Bearer <api key>'")
            tenant = auth.tenant_for(self.store, key.strip())
            if tenant is None:
                raise Unauthorized("invalid or revoked API key")
            return tenant
        if local:
            return LOCAL_TENANT
        raise Unauthorized(
            "an API key is required over TCP: send 'Authorization: Bearer <key>'"
            " (create one with `isorun keys create`)"
        )

    def endpoint(
        self,
        fn: Callable[[Request, str], Awaitable[Any]],
        *,
        status: int = 200,
        public: bool = False,
        head: Callable[[Request, str], Awaitable[Any]] | None = None,
        streams: bool = False,
    ) -> Handler:
        """A route's handler. Starlette answers HEAD with GET's handler and drops the body:
        a streaming GET would then run (a watch, an attach) until the client hung up, and
        hold its keep-alive connection meanwhile. Such a route answers HEAD with `head`,
        or refuses it (405) when it `streams` and has none."""

        async def handler(request: Request) -> Response:
            try:
                tenant = "" if public else self.tenant_of(request)
                run = fn
                if request.method == "HEAD" and (head is not None or streams):
                    if head is None:
                        refused = error_response(
                            405,
                            "method_not_allowed",
                            f"HEAD is not allowed on {request.url.path}: its GET is a stream",
                        )
                        refused.headers["allow"] = "GET"
                        return refused
                    run = head
                result = await run(request, tenant)
                if isinstance(result, Response):
                    return result
                # rendered here: a value it cannot encode is an error record, not a bare 500
                return JSONText(result, status_code=status)
            except Exception as exc:
                sandbox_id = request.path_params.get("sid")
                if sandbox_id is None:
                    return map_error(exc)
                # its tenant was checked: only an agent op of its sandbox loses a connection
                return map_error(await self.manager.explain(sandbox_id, exc))

        return handler

    @staticmethod
    def admin(tenant: str, what: str) -> None:
        """Refuse a tenant key `what` (say, "removing images"): it is the local admin's."""
        if tenant != LOCAL_TENANT:
            raise Forbidden(
                f"{what} is for the local administrator (on the daemon's unix socket), not "
                "for an API key"
            )


def _on_the_unix_socket(scope: Mapping[str, Any]) -> bool:
    """Whether a request came through the daemon's unix socket (root's alone: its caller is
    the local admin). Told by the listening side, which a TCP connection always has (its
    local address), never by the peer's address: that is missing also for a TCP client
    that reset its connection before the daemon took it up, whose request is still read,
    and that client then ran as the admin without a key."""
    server = scope.get("server")
    return server is None or (isinstance(server, list | tuple) and server[1] is None)
