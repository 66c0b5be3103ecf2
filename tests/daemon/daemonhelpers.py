"""A real isorund in a subprocess on a temp unix socket, temp state dir and a TCP port,
plus the leak check (no VM process or run dir left)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from vmhelpers import qemu_pids_for

from isorun.daemon.sandboxes import SANDBOX_LABEL
from isorun.daemon.store import LOCAL_TENANT, SandboxRow
from isorun.vmm.rundir import LABELS_FILE

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.state = root / "state"
        self.sock = root / "isorund.sock"
        self.port = free_port()
        self.env = dict(
            os.environ,
            ISORUN_STATE_DIR=str(self.state),
            ISORUN_SOCKET=str(self.sock),
            ISORUN_TCP=f"127.0.0.1:{self.port}",
            ISORUN_ALLOW_RAW_ROOTFS="1",
            ISORUN_AUTOSTART="0",
            ISORUN_API_URL=f"unix:{self.sock}",
            **env,
        )
        self.env.pop("ISORUN_API_KEY", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Daemon:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "isorund.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "isorun.daemon"], env=self.env, stdout=log, stderr=log, cwd=REPO
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client().get("/v1/health").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"isorund did not start: {self.log()[-3000:]}")

    def log(self) -> str:
        return (self.root / "isorund.log").read_text(errors="replace")

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(
            base_url="http://isorund",
            headers=headers,
            timeout=120,
            transport=httpx.HTTPTransport(uds=str(self.sock)),
        )

    def tcp(self, key: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=headers, timeout=120)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def vm_dirs(self) -> list[Path]:
        d = self.state / "vms"
        return sorted(d.iterdir()) if d.is_dir() else []


def assert_no_leaks(d: Daemon) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (qemu_pids_for(d.state) or d.vm_dirs()):
        time.sleep(0.1)
    assert qemu_pids_for(d.state) == [], "QEMU processes left behind"
    assert d.vm_dirs() == [], f"VM run dirs left behind: {d.vm_dirs()}"


@contextmanager
def running_daemon(root: Path, own_images: bool = False, **env: str) -> Iterator[Daemon]:
    """A started isorund (256 MiB guests) under `root`; on exit its sandboxes are deleted,
    it is stopped, and nothing may be left behind. `own_images` gives it an empty image
    store of its own (for pull tests) instead of the shared cache."""
    if own_images:
        env.setdefault("ISORUN_IMAGE_DIR", str(root / "images"))
    d = Daemon(root, ISORUN_DEFAULT_MEMORY_MIB="256", **env).start()
    try:
        yield d
    finally:
        with d.client() as c:
            for sb in c.get("/v1/sandboxes").json().get("sandboxes", []):
                c.delete(f"/v1/sandboxes/{sb['id']}")
        d.stop()
        assert_no_leaks(d)


def ndjson(resp: httpx.Response) -> list[dict[str, Any]]:
    """The records of an NDJSON body, without the keepalives a slow run may add."""
    import json

    records = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
    return [r for r in records if r.get("type") != "keepalive"]


def sandbox_row(sandbox_id: str, **fields: Any) -> SandboxRow:
    """A running sandbox's row as the store keeps it (the local tenant's, 1 vCPU, 256 MiB,
    a 60 s timeout from now), with `fields` changed: for tests that write rows directly."""
    now = time.time()
    base: dict[str, Any] = {
        "id": sandbox_id,
        "tenant_id": LOCAL_TENANT,
        "image": "base",
        "vcpus": 1,
        "memory_mib": 256,
        "disk_mib": 64,
        "env": {},
        "metadata": {},
        "state": "running",
        "created": now,
        "timeout_s": 60,
        "expires": now + 60,
    }
    return SandboxRow(**{**base, **fields})


def dead_vm_row(
    vms_dir: Path, sandbox_id: str, vm_id: str, start: float, died: float
) -> SandboxRow:
    """A running sandbox (started at `start`, 1 h timeout) whose VM died at `died` while no
    daemon ran: its run dir is there, last written then (vm.json's pid is long gone)."""
    run_dir = vms_dir / vm_id
    run_dir.mkdir(parents=True)
    (run_dir / LABELS_FILE).write_text(json.dumps({SANDBOX_LABEL: sandbox_id}))
    (run_dir / "vm.json").write_text(json.dumps({"id": vm_id, "pid": 999999}))
    (run_dir / "console.log").write_text("booted\nKernel panic\n")
    for f in run_dir.iterdir():
        os.utime(f, (died, died))
    return sandbox_row(
        sandbox_id,
        created=start,
        started=start,
        timeout_s=3600,
        expires=start + 3600,
        run_dir=str(run_dir),
        vm_id=vm_id,
    )
