"""The OpenAPI 3.1 description of the API, built from the request models (so it cannot drift
from validation). `python -m isorun.daemon.openapi > openapi.json` regenerates the copy in
the repository; a test checks they match."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from isorun import __version__
from isorun.daemon import models

_ERR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_JSON = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
# Every NDJSON stream: a silence of /v1/health's stream_keepalive_s carries one.
_KEEPALIVE = " | {type:keepalive} (through silences; skip it)"
_STREAM_EVENTS = (
    "NDJSON stream, one event per line: "
    "{type:start,proc_id,pid} | {type:attached,offset,lost} | "
    "{type:stdout|stderr,data:<base64>} | {type:gap,lost,offset} (a process stream's slow "
    "reader skipped `lost` bytes; output goes on at `offset`) | "
    "{type:exit,proc_id,exit_code,signal,timed_out,duration_ms} | "
    "{type:error,status,code,message}" + _KEEPALIVE
)
_NDJSON_CONTENT = {"application/x-ndjson": {"schema": {"type": "string"}}}
_NDJSON = {"description": _STREAM_EVENTS, "content": _NDJSON_CONTENT}
# exec: a stream, but a background exec answers once, with the process it started.
_EXEC = {
    "description": _STREAM_EVENTS + "; with background=true a JSON object {proc_id, pid}",
    "content": {
        **_NDJSON_CONTENT,
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"proc_id": {"type": "string"}, "pid": {"type": "integer"}},
                "required": ["proc_id", "pid"],
            }
        },
    },
}
_PROGRESS_EVENTS = (
    "{type:progress,phase,ref,message?,digest?,bytes_done?,bytes_total?} with phase in "
    "resolving|pulling|unpacking|building|converting|waiting|cached|done (pulling repeats "
    "with byte counts; a slow reader gets coalesced updates)"
)
_PULL = {
    "description": "NDJSON stream, one event per line: "
    + _PROGRESS_EVENTS
    + " | {type:image,image:{digest,names,size_bytes,disk_bytes,source,created}} (last) | "
    "{type:error,status,code,message} (last)" + _KEEPALIVE,
    "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
}
_CREATE = {
    "description": "the sandbox (JSON); with ?progress=1 an NDJSON stream: "
    + _PROGRESS_EVENTS
    + " | {type:progress,phase:booting,ref,sandbox} | {type:sandbox,sandbox:{...}} (last) | "
    "{type:error,status,code,message} (last)" + _KEEPALIVE,
    "content": {
        "application/json": {"schema": {"type": "object"}},
        "application/x-ndjson": {"schema": {"type": "string"}},
    },
}
_BYTES = {
    "description": "file bytes",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}

SID = {"name": "sid", "in": "path", "required": True, "schema": {"type": "string"}}
PID = {"name": "pid", "in": "path", "required": True, "schema": {"type": "string"}}
KID = {"name": "kid", "in": "path", "required": True, "schema": {"type": "string"}}
PATHQ = {"name": "path", "in": "query", "required": True, "schema": {"type": "string"}}


def _q(name: str, typ: str = "integer", description: str = "") -> dict[str, Any]:
    q: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": {"type": typ}}
    if description:
        q["description"] = description
    return q


MODE_Q = _q(
    "mode",
    "string",
    "permission bits in octal, as 0o644 or 0644 (a bare 644 is refused as ambiguous); absent: "
    "an existing file keeps its mode, a new one gets 0644",
)


# (method, path, operationId, summary, request model, params, success response)
OPS: list[
    tuple[str, str, str, str, type[BaseModel] | str | None, list[dict[str, Any]], dict[str, Any]]
] = [
    ("get", "/v1/health", "health", "Liveness (no auth)", None, [], _JSON),
    ("get", "/v1/info", "info", "Daemon version, tenant, capacity, price", None, [], _JSON),
    (
        "post",
        "/v1/sandboxes",
        "createSandbox",
        "Create and boot a sandbox; progress=1 streams image pull/build and boot progress",
        models.CreateSandbox,
        [_q("progress", "string")],
        _CREATE,
    ),
    (
        "get",
        "/v1/sandboxes",
        "listSandboxes",
        "List sandboxes; filter with metadata.KEY=VALUE, all=1 includes ended ones",
        None,
        [_q("all", "string")],
        _JSON,
    ),
    ("get", "/v1/sandboxes/{sid}", "getSandbox", "Get one sandbox", None, [SID], _JSON),
    (
        "delete",
        "/v1/sandboxes/{sid}",
        "killSandbox",
        "Kill a sandbox; returns {cpu_ms, mem_peak_bytes, uptime_ms, billed_seconds, cost_usd}",
        None,
        [SID],
        _JSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/timeout",
        "setTimeout",
        "Set the sandbox timeout (seconds from now)",
        models.SetTimeout,
        [SID],
        _JSON,
    ),
    (
        "get",
        "/v1/sandboxes/{sid}/logs",
        "getLogs",
        "Guest console tail (text)",
        None,
        [SID],
        {"description": "text", "content": {"text/plain": {"schema": {"type": "string"}}}},
    ),
    (
        "get",
        "/v1/sandboxes/{sid}/metrics",
        "getMetrics",
        "Host-measured usage so far",
        None,
        [SID],
        _JSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/exec",
        "exec",
        "Run a command: NDJSON stream; with background=true, JSON {proc_id, pid}",
        models.ExecRequest,
        [SID],
        _EXEC,
    ),
    (
        "get",
        "/v1/sandboxes/{sid}/processes",
        "listProcesses",
        "Processes of the sandbox",
        None,
        [SID],
        _JSON,
    ),
    (
        "get",
        "/v1/sandboxes/{sid}/processes/{pid}/stream",
        "connectProcess",
        "Replay a process's output from offset and follow it to its exit (NDJSON)",
        None,
        [SID, PID, _q("offset")],
        _NDJSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/processes/{pid}/kill",
        "killProcess",
        "SIGTERM, SIGKILL after grace",
        models.KillProcess,
        [SID, PID],
        _JSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/processes/{pid}/signal",
        "signalProcess",
        "Send a signal to the process group",
        models.SignalProcess,
        [SID, PID],
        _JSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/processes/{pid}/stdin",
        "sendStdin",
        "Write the raw request body (at most 1 MiB) to the stdin of a running process started"
        " with open_stdin=true or on a PTY (keystrokes); 409 if it has exited or has no stdin",
        "binary",
        [SID, PID],
        _JSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/processes/{pid}/stdin/close",
        "closeStdin",
        "EOF on the process's stdin after the bytes already sent (^D on a PTY)",
        None,
        [SID, PID],
        _JSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/processes/{pid}/resize",
        "resizePty",
        "Set the terminal size of a PTY process (409 if it has no PTY)",
        models.Resize,
        [SID, PID],
        _JSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/pty",
        "openPty",
        "Start an interactive terminal (default: a login shell, TERM=xterm-256color) as a"
        " background PTY process; returns {proc_id, pid}. Output: GET"
        " .../processes/{pid}/stream; keystrokes: POST .../stdin; size: POST .../resize",
        models.PtyRequest,
        [SID],
        _JSON,
    ),
    (
        "get",
        "/v1/sandboxes/{sid}/files",
        "readFile",
        "Read a file (streamed)",
        None,
        [SID, PATHQ],
        _BYTES,
    ),
    (
        "put",
        "/v1/sandboxes/{sid}/files",
        "writeFile",
        "Write a file from the raw request body (streamed; atomic unless append=1)",
        "binary",
        [SID, PATHQ, MODE_Q, _q("append", "string")],
        _JSON,
    ),
    (
        "get",
        "/v1/sandboxes/{sid}/files/list",
        "listFiles",
        "List a directory",
        None,
        [SID, PATHQ, _q("depth")],
        _JSON,
    ),
    ("get", "/v1/sandboxes/{sid}/files/stat", "statFile", "Stat a path", None, [SID, PATHQ], _JSON),
    (
        "get",
        "/v1/sandboxes/{sid}/files/watch",
        "watchFiles",
        "Filesystem events as NDJSON {type:fs, op, path} (and {type:keepalive})",
        None,
        [SID, PATHQ, _q("recursive", "string")],
        _NDJSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/files/mkdir",
        "mkdir",
        "Create a directory",
        models.MkdirOp,
        [SID],
        _JSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/files/remove",
        "remove",
        "Remove a path",
        models.RemoveOp,
        [SID],
        _JSON,
    ),
    (
        "post",
        "/v1/sandboxes/{sid}/files/rename",
        "rename",
        "Rename a path",
        models.RenameOp,
        [SID],
        _JSON,
    ),
    (
        "get",
        "/v1/usage",
        "usage",
        "Usage records and totals of the caller's key",
        None,
        [_q("since", "number"), _q("until", "number")],
        _JSON,
    ),
    ("get", "/v1/images", "listImages", "Images in the daemon's store", None, [], _JSON),
    (
        "post",
        "/v1/images/pull",
        "pullImage",
        "Pull (or build, for a template) an image into the store, streaming progress",
        models.PullImage,
        [],
        _PULL,
    ),
    (
        "get",
        "/v1/images/inspect",
        "inspectImage",
        "One image: digest, names, size, config (env, working_dir, user, entrypoint, cmd)",
        None,
        [_q("ref", "string")],
        _JSON,
    ),
    (
        "delete",
        "/v1/images",
        "removeImage",
        "Remove an image (local admin only; 409 while a sandbox uses it)",
        None,
        [_q("ref", "string")],
        _JSON,
    ),
    (
        "post",
        "/v1/images/gc",
        "gcImages",
        "Delete unused unnamed images (all unused with ?all=1) and stale work dirs (local admin)",
        None,
        [_q("all", "boolean")],
        _JSON,
    ),
    (
        "get",
        "/v1/images/usage",
        "imagesDiskUsage",
        "Disk used by the image store (local admin only)",
        None,
        [],
        _JSON,
    ),
    (
        "post",
        "/v1/keys",
        "createKey",
        "Create an API key (local admin only)",
        models.CreateKey,
        [],
        _JSON,
    ),
    ("get", "/v1/keys", "listKeys", "List API keys (local admin only)", None, [], _JSON),
    (
        "delete",
        "/v1/keys/{kid}",
        "revokeKey",
        "Revoke an API key (local admin only)",
        None,
        [KID],
        _JSON,
    ),
]


def build_spec() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        }
    }
    for method, path, op_id, summary, body, params, ok in OPS:
        op: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            "responses": {
                "200" if op_id not in ("createSandbox", "createKey", "openPty") else "201": ok,
                "default": _ERR,
            },
        }
        if params:
            op["parameters"] = params
        if body == "binary":
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        elif body is not None:
            assert not isinstance(body, str)
            schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas[name] = sub
            schemas[body.__name__] = schema
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{body.__name__}"}
                    }
                },
            }
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "isorun API",
            "version": __version__,
            "description": "Sandboxes (microVMs) for AI agents. Auth: Bearer API key "
            "over TCP; the local unix socket needs none.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}, {}],
        "paths": paths,
    }


def render() -> str:
    return json.dumps(build_spec(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
