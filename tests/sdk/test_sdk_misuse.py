"""What a user sees when the SDK is misused, pointed at the wrong thing, or meets a daemon
that cannot serve: errors that say what to change, never a raw TypeError, KeyError or
httpx RuntimeError. No VM boots here (the daemon's fixture serves without one)."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from daemonhelpers import REPO, Daemon
from fakeapi import serving

from isorun import ApiError, AsyncSandbox, DaemonUnavailable, Images, Sandbox
from isorun.errors import ConfigError, IsorunError
from isorun.sdk import SandboxNotStartedError
from isorun.sdk.sandbox_sync import Process


class _Proxy(BaseHTTPRequestHandler):
    """What sits at a wrong API URL: a proxy redirecting http to https, or a web page."""

    mode = "redirect"

    def do_GET(self) -> None:
        if self.mode == "redirect":
            self.send_response(301)
            self.send_header("location", f"https://isorun.example{self.path}")
            self.send_header("content-length", "0")
            self.end_headers()
        else:
            body = b"<html>welcome to nginx</html>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[str]:
    with serving(_Proxy) as url:
        yield url
        _Proxy.mode = "redirect"


def test_a_redirect_or_a_web_page_at_the_api_url_is_an_api_error(proxy: str) -> None:
    with pytest.raises(ApiError, match=r"301.*https://isorun\.example/v1/sandboxes") as err:
        Sandbox.list(api_url=proxy)
    assert err.value.status == 301 and err.value.code == "redirect"
    assert "api_url" in str(err.value)
    with pytest.raises(ApiError, match="redirect"):
        Sandbox.connect("sb-0123456789abcdef", api_url=proxy)
    _Proxy.mode = "page"
    with pytest.raises(ApiError, match=r"not JSON \(text/html") as page:
        Sandbox.list(api_url=proxy)
    assert page.value.status == 200 and page.value.code == "not_json"
    with pytest.raises(ApiError, match="not JSON"):
        Images(api_url=proxy).list()


async def test_ids_that_are_not_ids_are_refused_before_they_reach_a_url(api: str) -> None:
    # "" asked for the sandbox list, "../../v1/info" for the daemon's info: KeyError 'state'
    for bad, says in (("", "is empty"), ("../../v1/info", "is not an id"), ("..", "is not an id")):
        expected = re.escape(f"sandbox id {bad!r} {says}")
        with pytest.raises(ValueError, match=expected):
            Sandbox.connect(bad, api_url=api)
        with pytest.raises(ValueError, match=expected):
            await AsyncSandbox.connect(bad, api_url=api)


async def test_process_ids_that_are_not_ids_are_refused_before_any_request(proxy: str) -> None:
    # docs/api.md: an empty id, or one with a '/', raises ValueError before any request;
    # processes.connect sent one (here: the proxy's redirect) and then said 404.
    sb = Sandbox(api_url=proxy, _info={"id": "sb-0123456789abcdef"})
    asb = AsyncSandbox(api_url=proxy)  # never started: any request would say so
    try:
        for bad, says in (("", "is empty"), ("a/b", "is not an id")):
            expected = re.escape(f"process id {bad!r} {says}")
            with pytest.raises(ValueError, match=expected):
                sb.processes.connect(bad)
            with pytest.raises(ValueError, match=expected):
                await asb.processes.connect(bad)
    finally:
        sb.close()
        await asb.close()


def test_an_api_url_that_is_not_http_says_what_to_give() -> None:
    for bad in ("ftp://x", "localhost:8080", "http://"):
        with pytest.raises(ConfigError, match=re.escape(f"API URL {bad!r}") + ".*http://HOST"):
            Sandbox("base", api_url=bad)


async def test_an_async_sandbox_never_started_says_how_to_start_it(api: str) -> None:
    sb = AsyncSandbox(api_url=api)
    try:
        for call in (
            lambda: sb.exec("true"),
            lambda: sb.files.read("/etc/hostname"),
            lambda: sb.files.write("/tmp/x", "x"),
            lambda: sb.processes.list(),
            lambda: sb.info(),
            lambda: sb.destroy(),
        ):
            with pytest.raises(SandboxNotStartedError, match=r"await AsyncSandbox\.create"):
                await call()
        with pytest.raises(SandboxNotStartedError, match="async with"):
            await sb.files.watch("/tmp")
    finally:
        await sb.close()


def test_autostart_reports_a_daemon_that_exited_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to wait its whole 30 s for a daemon that had died at start, then say only
    that it did not answer."""
    (tmp_path / "file").write_text("not a directory")
    sock = tmp_path / "file" / "isorund.sock"  # the daemon cannot make its directory
    monkeypatch.setenv("ISORUN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("ISORUN_TCP", raising=False)
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable, match="exited") as err:
        Sandbox.list(api_url=f"unix:{sock}", autostart=True)
    assert time.monotonic() - t0 < 20
    # the end of its log says why
    assert "File exists" in str(err.value) and "isorund.log" in str(err.value)


NOBODY = 65534


def _as_nobody(call: Callable[[], object]) -> str:
    """What `call()` raises in a forked child running as uid/gid 65534 (a non-root user):
    "<IsorunError or not> <type>: <message>". (A fresh interpreter cannot start as that user:
    this Python lives under /root.)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                call()
                said = "returned"
            except BaseException as exc:
                kind = "IsorunError" if isinstance(exc, IsorunError) else "not-IsorunError"
                said = f"{kind} {type(exc).__name__}: {exc}"
            os.write(w, said.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    return said


def test_a_non_root_user_is_told_the_daemon_is_roots(daemon: Daemon) -> None:
    """For a non-root user the root daemon's 0600 socket did not answer, so auto-start ran
    and raised a bare PermissionError about /var/lib/isorun/isorund.log, past `except
    IsorunError` and naming a log file rather than the cause."""
    shared = Path(tempfile.mkdtemp(prefix="isorun-nonroot-"))
    try:
        shared.chmod(0o755)  # a user may reach it, as /run/isorun
        os.link(daemon.sock, shared / "isorund.sock")  # the running daemon's socket: root's
        running = _as_nobody(lambda: Sandbox.list(api_url=f"unix:{shared}/isorund.sock"))
        assert running.startswith("IsorunError DaemonUnavailable:"), running
        for names in ("root", "ISORUN_API_URL", "ISORUN_API_KEY", "isorun keys create"):
            assert names in running, running
        absent = f"unix:{shared}/absent.sock"  # no daemon: auto-start cannot write its log

        def start() -> object:
            os.environ.pop("ISORUN_STATE_DIR", None)  # the default, /var/lib/isorun
            return Sandbox.list(api_url=absent, autostart=True)

        started = _as_nobody(start)
        assert started.startswith("IsorunError DaemonUnavailable:"), started
        for names in ("auto-start", "root", "ISORUN_API_URL", "ISORUN_API_KEY"):
            assert names in started, started
    finally:
        for f in shared.iterdir():
            f.unlink()
        shared.rmdir()


def test_an_api_key_is_told_which_admin_action_it_may_not_do(daemon: Daemon) -> None:
    with daemon.client() as c:
        key = c.post("/v1/keys", json={"tenant_id": "t-admin", "name": "k"}).json()["key"]
    images = Images(api_url=f"http://127.0.0.1:{daemon.port}", api_key=key)
    for call, what in (
        (images.gc, "garbage-collecting images"),
        (lambda: images.remove("base"), "removing images"),
        (images.disk_usage, "seeing the image store's disk usage"),
    ):
        with pytest.raises(ApiError, match=f"^{what} is for the local administrator") as err:
            call()
        assert err.value.status == 403
    with daemon.tcp(key) as t:
        refused = t.get("/v1/keys")
    assert refused.status_code == 403
    assert refused.json()["error"]["message"].startswith("managing API keys is for")


TYPED = """
from collections.abc import AsyncIterator, Iterator
from typing import assert_type

from isorun import AsyncProcess, AsyncSandbox, ExecResult, Process, Sandbox


def sync(sb: Sandbox, bg: bool) -> None:
    assert_type(sb.exec("true"), ExecResult)
    assert_type(sb.exec("true", background=True), Process)
    assert_type(sb.exec("true", background=bg), ExecResult | Process)
    assert_type(sb.files.read("/f"), str)
    assert_type(sb.files.read("/f", format="bytes"), bytes)
    assert_type(sb.files.read("/f", format="stream"), Iterator[bytes])
    sb.exec("true").stdot


async def aio(sb: AsyncSandbox) -> None:
    assert_type(await sb.exec("true"), ExecResult)
    assert_type(await sb.exec("true", background=True), AsyncProcess)
    assert_type(await sb.files.read("/f"), str)
    assert_type(await sb.files.read("/f", format="bytes"), bytes)
    assert_type(await sb.files.read("/f", format="stream"), AsyncIterator[bytes])
"""


def test_exec_and_read_are_typed_by_their_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A type checker knows what exec() and files.read() return (they were Any), so a typo
    in a result's field is caught before it runs."""
    from mypy import api as mypy_api

    (tmp_path / "use.py").write_text(TYPED)
    (tmp_path / "mypy.ini").write_text("[mypy]\n")
    monkeypatch.setenv("MYPYPATH", str(REPO))  # this checkout's isorun, not an installed one
    out, err, _ = mypy_api.run(
        [
            str(tmp_path / "use.py"),
            "--config-file",
            str(tmp_path / "mypy.ini"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--follow-imports=silent",
            "--python-version=3.11",
            "--no-error-summary",
        ]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1 and '"ExecResult" has no attribute "stdot"' in errors[0], out + err


async def test_arguments_of_the_wrong_kind_are_refused_before_any_request(proxy: str) -> None:
    """Each of these went through: stdin=123 fed 123 zero bytes (bytes(123)), a path 123
    named a file in the home directory, mode=644 made a sticky --w----r-- file (the API
    refuses a bare 644 for this), and 50 MiB of stdin failed as a count of base64 characters.
    Here they fail before anything reaches the (wrong) API URL."""
    sb = Sandbox(api_url=proxy, _info={"id": "sb-0123456789abcdef"})
    asb = AsyncSandbox(api_url=proxy)
    asb._info, asb.id = {"id": "sb-0123456789abcdef"}, "sb-0123456789abcdef"  # as if started
    try:
        with pytest.raises(TypeError, match="stdin must be str or bytes, not int"):
            sb.exec("cat", stdin=123)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="stdin must be str or bytes, not int"):
            await asb.exec("cat", stdin=123)  # type: ignore[arg-type]
        with pytest.raises(
            ValueError, match=r"stdin of 50331649 bytes is over the 48 MiB.*files\.write"
        ):
            sb.exec("wc -c", stdin=b"q" * ((48 << 20) + 1))
        with pytest.raises(TypeError, match="a sandbox path must be str"):
            sb.files.read(123)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="a sandbox path must be str"):
            await asb.files.stat(123)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"files\.write takes str, bytes, a binary file"):
            sb.files.write("/tmp/f", 123)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"files\.write takes str, bytes, a binary file"):
            await asb.files.write("/tmp/f", 123)  # type: ignore[arg-type]
        for face in (sb.files.write, asb.files.write):
            with pytest.raises(
                ValueError, match=r"mode=644 is the decimal number 644 \(0o1204\); write mode=0o644"
            ):
                result = face("/tmp/f", "x", mode=644)
                if asyncio.iscoroutine(result):
                    await result
        with pytest.raises(ValueError, match="no signal is named 'HUPP'"):
            Process(sb, "p1", 1).signal("HUPP")
    finally:
        sb.close()
        await asb.close()
