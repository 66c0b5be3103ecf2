"""Run host tools as asyncio subprocesses with a deadline and bounded output capture."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from isorun.images.errors import ImageToolError, ToolMissingError

MAX_CAPTURE = 64 * 1024

_INSTALL_HINT = {
    "skopeo": "apt-get install skopeo",
    "umoci": "apt-get install umoci",
    "mkfs.ext4": "apt-get install e2fsprogs",
    "mmdebstrap": "apt-get install mmdebstrap",
    "prlimit": "apt-get install util-linux",
}


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: str


def which(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        hint = _INSTALL_HINT.get(tool, f"install {tool}")
        raise ToolMissingError(
            f"{tool} is not installed: run `{hint}` (or scripts/install-deps-images.sh)"
        )
    return path


async def _read_bounded(stream: asyncio.StreamReader | None, limit: int) -> bytes:
    if stream is None:
        return b""
    buf = bytearray()
    while chunk := await stream.read(65536):
        if len(buf) < limit:
            buf += chunk[: limit - len(buf)]
    return bytes(buf)


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    stdout_limit: int = MAX_CAPTURE,
    cwd: str | None = None,
) -> Result:
    """Run argv[0] (looked up on PATH); never raises on a non-zero exit, only on timeout."""
    exe = which(argv[0])
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        exe,
        *argv[1:],
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(_collect(proc, stdout_limit), timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(proc.wait(), 10)
        if isinstance(exc, TimeoutError) and not _cancelling():
            raise ImageToolError(
                f"{argv[0]} did not finish within {timeout:.0f}s and was killed; "
                "raise the store's pull_timeout_s for large images or slow registries"
            ) from None
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out, err.decode(errors="replace"))


def _cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task and task.cancelling())


async def _collect(proc: asyncio.subprocess.Process, stdout_limit: int) -> tuple[bytes, bytes]:
    out, err, _ = await asyncio.gather(
        _read_bounded(proc.stdout, stdout_limit),
        _read_bounded(proc.stderr, MAX_CAPTURE),
        proc.wait(),
    )
    return out, err


def tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
