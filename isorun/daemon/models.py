"""Request bodies. Strict: unknown fields, wrong types and out-of-range sizes are refused."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from isorun.daemon.store import LOCAL_TENANT
from isorun.fsnames import surrogate_problem
from isorun.images.config import MAX_ENV_BYTES

MAX_TIMEOUT_S = 30 * 86400
Key = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00=]+$")]
Val = Annotated[str, StringConstraints(max_length=65536, pattern=r"^[^\x00]*$")]
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]
MetaVal = Annotated[str, StringConstraints(max_length=1024, pattern=r"^[^\x00]*$")]
PATH_MAX_CHARS = 4096


def _a_path(v: object) -> str:
    """A path in the sandbox. A name that is not UTF-8 comes as Python holds it (each byte
    that is not UTF-8 the lone surrogate U+DC80+byte, a "\\udcXX" escape in JSON), as
    listings give it: checked here, as pydantic's own str checks refuse any surrogate."""
    if not isinstance(v, str):
        raise ValueError("a path must be a string")
    if not 1 <= len(v) <= PATH_MAX_CHARS or "\x00" in v:
        raise ValueError(f"a path must be 1 to {PATH_MAX_CHARS} characters, without NUL")
    if problem := surrogate_problem(v):
        raise ValueError(f"a path {problem}")
    return v


Path_ = Annotated[
    str,
    PlainValidator(_a_path),
    WithJsonSchema(
        {"type": "string", "minLength": 1, "maxLength": PATH_MAX_CHARS, "pattern": "^[^\\x00]+$"}
    ),
]
# A program's command line, arguments and user are C strings: no NUL (as env and paths).
Cmd = Annotated[str, StringConstraints(min_length=1, max_length=1 << 20, pattern=r"^[^\x00]+$")]
Argv = Annotated[
    list[Annotated[str, StringConstraints(max_length=1 << 20, pattern=r"^[^\x00]*$")]],
    Field(min_length=1, max_length=4096),
]
User = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00]+$")]


def env_bytes(env: dict[str, str]) -> int:
    """An env's size as the guest agent is sent it (compact JSON)."""
    return len(json.dumps(env, separators=(",", ":")))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateSandbox(Strict):
    image: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        "base", description="template name (base, python, node) or OCI image reference"
    )
    vcpus: int | None = Field(None, ge=1, le=64)
    memory_mib: int | None = Field(None, ge=128, le=256 * 1024)
    disk_mib: int | None = Field(None, ge=64, le=1024 * 1024, description="writable layer size")
    env: dict[Key, Val] = Field(
        default_factory=dict,
        max_length=1024,
        description=f"at most {MAX_ENV_BYTES} bytes as JSON (with the image's own env, "
        "at most what one request to the guest agent may carry)",
    )
    metadata: dict[MetaKey, MetaVal] = Field(default_factory=dict, max_length=64)
    sandbox_timeout: int | None = Field(
        None, ge=1, le=MAX_TIMEOUT_S, description="seconds until the sandbox is killed"
    )

    @field_validator("image")
    @classmethod
    def _image_as_resolved(cls, v: str) -> str:
        # The reference is resolved stripped ("base\n" is base): the sandbox's record must
        # show that, not what was sent. What is left is checked where it is resolved.
        return v.strip()

    @field_validator("env")
    @classmethod
    def _env_fits(cls, v: dict[str, str]) -> dict[str, str]:
        # It is sent to the guest agent in one frame (64 KiB) with the image's env, after
        # the boot: refused here, not once a VM has booted and been billed.
        size = env_bytes(v)
        if size > MAX_ENV_BYTES:
            raise ValueError(
                f"env is {size} bytes as JSON, over the limit of {MAX_ENV_BYTES}; "
                "write big values to files in the sandbox (PUT .../files) instead"
            )
        return v


class PullImage(Strict):
    image: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        ..., description="template name (base, python, node) or OCI image reference"
    )
    pull: Literal["missing", "always"] = Field(
        "missing",
        description="missing: a cached tag needs no registry round trip; always: re-resolve",
    )


class SetTimeout(Strict):
    sandbox_timeout: int = Field(..., ge=1, le=MAX_TIMEOUT_S)


class ExecRequest(Strict):
    cmd: Cmd | None = None
    argv: Argv | None = None
    env: dict[Key, Val] = Field(default_factory=dict, max_length=1024)
    cwd: Path_ | None = None
    user: User | None = None
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, description="seconds")
    stdin: Annotated[str, StringConstraints(max_length=64 << 20)] | None = Field(
        None, description="base64 bytes fed to stdin, then EOF"
    )
    background: bool = False
    open_stdin: bool = Field(
        False,
        description="background only: keep stdin open for POST .../processes/{pid}/stdin"
        " (closed by .../stdin/close); otherwise a background process reads /dev/null",
    )
    pty: PtySize | None = None
    tag: Annotated[str, StringConstraints(max_length=256)] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ExecRequest:
        if (self.cmd is None) == (self.argv is None):
            raise ValueError("pass exactly one of 'cmd' (a shell string) or 'argv' (a list)")
        if self.background and self.stdin is not None:
            raise ValueError(
                "'stdin' is only for foreground exec; for a background process pass"
                " 'open_stdin': true and POST .../processes/{proc_id}/stdin"
            )
        if self.open_stdin and not self.background:
            raise ValueError("'open_stdin' is for background processes; use 'stdin' (base64)")
        return self


class PtyRequest(Strict):
    """An interactive terminal: a background process on a PTY (default: a login shell)."""

    cmd: Cmd | None = None
    argv: Argv | None = None
    rows: int = Field(24, ge=1, le=1000)
    cols: int = Field(80, ge=1, le=1000)
    env: dict[Key, Val] = Field(default_factory=dict, max_length=1024)
    cwd: Path_ | None = None
    user: User | None = None
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, description="seconds")

    @model_validator(mode="after")
    def _at_most_one(self) -> PtyRequest:
        if self.cmd is not None and self.argv is not None:
            raise ValueError("pass at most one of 'cmd' (a shell string) or 'argv' (a list)")
        return self


class Resize(Strict):
    rows: int = Field(..., ge=1, le=1000)
    cols: int = Field(..., ge=1, le=1000)


class PtySize(Strict):
    rows: int = Field(24, ge=1, le=1000)
    cols: int = Field(80, ge=1, le=1000)


class KillProcess(Strict):
    grace: float = Field(2.0, ge=0, le=300)


class SignalProcess(Strict):
    signal: int = Field(..., ge=1, le=64)


class PathOp(Strict):
    path: Path_


class MkdirOp(Strict):
    path: Path_
    parents: bool = True
    mode: int = Field(0o755, ge=0, le=0o7777)


class RemoveOp(Strict):
    path: Path_
    recursive: bool = False


class RenameOp(Strict):
    src: Path_
    dst: Path_


class CreateKey(Strict):
    name: Annotated[str, StringConstraints(max_length=128)] = ""
    tenant_id: (
        Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
        | None
    ) = None

    @field_validator("tenant_id")
    @classmethod
    def _not_the_local_admin(cls, v: str | None) -> str | None:
        # the unix socket's tenant is the admin: a key of it would be the admin over TCP
        if v == LOCAL_TENANT:
            raise ValueError(f"tenant {LOCAL_TENANT!r} is reserved for the local unix socket")
        return v


ExecRequest.model_rebuild()
