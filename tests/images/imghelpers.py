"""Helpers and fixtures for image tests (re-exported by conftest.py): real loopback
registries (plain and htpasswd), and helpers that read ext4 images with debugfs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from isorun.images import Image, ImageStore, StoreConfig

REQUIRED = ["skopeo", "umoci", "mkfs.ext4", "debugfs", "docker-registry", "zstd", "ip"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_tools: pure-Python test, runs without host tools")
    config.addinivalue_line("markers", "slow: builds large templates (minutes); still runs in CI")


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Fails, never skips: a machine without these tools would otherwise pass with the whole
    # image suite skipped (CI installs them with scripts/install-deps-images.sh, as root).
    if "tests/images" not in str(item.fspath) or "no_tools" in item.keywords:
        return
    missing = [t for t in REQUIRED if not shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin")]
    if missing or os.geteuid() != 0:
        why = f"needs root and {', '.join(missing)} (scripts/install-deps-images.sh)"
        pytest.fail(why, pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    storage: Path
    proc: subprocess.Popen[bytes]
    user: str | None = None
    password: str | None = None

    def push(self, src: str, repo_tag: str, *, all_: bool = False, fmt: str | None = None) -> str:
        """skopeo copy `src` (e.g. oci:/dir:tag) to this registry; returns the manifest digest."""
        argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
        if self.user:
            argv.append(f"--dest-creds={self.user}:{self.password}")
        if all_:
            argv.append("--all")
        if fmt:
            argv.append(f"--format={fmt}")
        subprocess.run(
            [*argv, src, f"docker://{self.host}/{repo_tag}"], check=True, capture_output=True
        )
        return self.digest(repo_tag)

    def digest(self, repo_tag: str) -> str:
        argv = ["skopeo", "inspect", "--raw", "--tls-verify=false"]
        if self.user:
            argv.append(f"--creds={self.user}:{self.password}")
        raw = subprocess.run(
            [*argv, f"docker://{self.host}/{repo_tag}"], check=True, capture_output=True
        ).stdout
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def put_raw(self, repo: str, tag: str, manifest: bytes, blobs: list[bytes]) -> None:
        """Upload blobs and a manifest byte for byte over the registry API, bypassing
        skopeo's checks, to serve manifests a well-behaved tool would never write."""
        base = f"http://{self.host}/v2/{repo}"
        for data in blobs:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            start = urllib.request.Request(f"{base}/blobs/uploads/", method="POST")
            with urllib.request.urlopen(start) as r:
                loc = r.headers["Location"]
            if loc.startswith("/"):
                loc = f"http://{self.host}{loc}"
            put = urllib.request.Request(
                f"{loc}{'&' if '?' in loc else '?'}digest={digest}",
                data=data,
                method="PUT",
                headers={"Content-Type": "application/octet-stream"},
            )
            urllib.request.urlopen(put).close()
        mt = json.loads(manifest)["mediaType"]
        req = urllib.request.Request(
            f"{base}/manifests/{tag}", data=manifest, method="PUT", headers={"Content-Type": mt}
        )
        urllib.request.urlopen(req).close()

    def blob_path(self, digest: str) -> Path:
        h = digest.split(":")[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / h[:2] / h / "data"


def _start_registry(
    tmp: Path, htpasswd: Path | None, addr: str = "", netns: str | None = None
) -> Registry:
    """docker-registry on `addr` (default a free loopback port), inside `netns` if given."""
    addr = addr or f"127.0.0.1:{free_port()}"
    storage = tmp / "storage"
    storage.mkdir(parents=True)
    cfg = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": ""},
        },
        "http": {"addr": addr},
    }
    if htpasswd:
        cfg["auth"] = {"htpasswd": {"realm": "isorun-test", "path": str(htpasswd)}}
    (tmp / "config.yml").write_text(json.dumps(cfg))  # JSON is valid YAML
    log = (tmp / "registry.log").open("wb")
    in_netns = ["ip", "netns", "exec", netns] if netns else []
    proc = subprocess.Popen(
        [*in_netns, "docker-registry", "serve", str(tmp / "config.yml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _wait_serving(addr, proc, tmp / "registry.log")
    return Registry(addr, storage, proc)


def _wait_serving(addr: str, proc: subprocess.Popen[bytes], log: Path | None) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://{addr}/v2/", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # 401: up, wants auth
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text() if log else f"{proc.args} exited") from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{proc.args} did not serve {addr} within 15 s")


def _htpasswd(tmp: Path) -> Path:
    ht = tmp / "htpasswd"
    subprocess.run(
        ["htpasswd", "-Bbc", str(ht), "agent", "s3cret-pw"], check=True, capture_output=True
    )
    return ht


def _stop(reg: Registry) -> None:
    reg.proc.terminate()
    reg.proc.wait(10)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = _start_registry(tmp_path_factory.mktemp("registry"), None)
    yield reg
    _stop(reg)


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp("auth-registry")
    reg = _start_registry(tmp, _htpasswd(tmp))
    reg.user, reg.password = "agent", "s3cret-pw"
    yield reg
    _stop(reg)


@dataclass
class PublicRegistries:
    """Registries on a public (globally routable) address, as a tenant's pull from the
    internet meets them: `open` serves anyone, `auth` wants the agent/s3cret-pw login,
    `hostile` (host:port) answers everything with 401 and a token realm the test sets.
    `host_side` is this host's own address on the link to them."""

    open: Registry
    auth: Registry
    hostile: str
    host_side: str
    realm_file: Path

    def send_elsewhere(self, realm: str) -> None:
        self.realm_file.write_text(realm)


@pytest.fixture(scope="session")
def public_registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PublicRegistries]:
    """A host of our own in a network namespace, reached over a veth pair at a public
    address (no route leaves this machine: the /30 is on the veth alone)."""
    tag = os.getpid() % 100_000
    ns, here, there = f"isr-pub-{tag}", f"isrp{tag}a", f"isrp{tag}b"
    net = f"45.67.{tag % 250}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    started: list[subprocess.Popen[bytes]] = []
    try:
        for argv in (
            ["link", "add", here, "type", "veth", "peer", "name", there, "netns", ns],
            ["addr", "add", f"{net}.1/30", "dev", here],
            ["link", "set", here, "up"],
            ["-n", ns, "addr", "add", f"{net}.2/30", "dev", there],
            ["-n", ns, "link", "set", there, "up"],
            ["-n", ns, "link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", *argv], check=True, capture_output=True)
        tmp = tmp_path_factory.mktemp("public-registries")
        realm = tmp / "realm"
        realm.write_text("http://127.0.0.1:1/token")
        script = Path(__file__).with_name("hostile_registry.py")
        hostile = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(script), f"{net}.2", "5002", str(realm)]
        )
        started.append(hostile)
        _wait_serving(f"{net}.2:5002", hostile, None)
        for name in ("open", "auth"):
            (tmp / name).mkdir()
        opened = _start_registry(tmp / "open", None, f"{net}.2:5000", ns)
        started.append(opened.proc)
        auth = _start_registry(tmp / "auth", _htpasswd(tmp), f"{net}.2:5001", ns)
        started.append(auth.proc)
        auth.user, auth.password = "agent", "s3cret-pw"
        yield PublicRegistries(opened, auth, f"{net}.2:5002", f"{net}.1", realm)
    finally:
        for proc in started:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", ns], check=False)  # takes the veth pair with it


TEMPLATE_CACHE = Path(os.environ.get("ISORUN_TEST_TEMPLATE_CACHE", "/var/cache/isorun/test-images"))


@pytest.fixture(scope="session")
def template_store() -> ImageStore:
    """Templates are content-addressed by definition hash, so this cache survives runs."""
    return ImageStore(TEMPLATE_CACHE, StoreConfig(auth_file=None))


@pytest.fixture(scope="session")
def base_image(template_store: ImageStore) -> Image:
    t0 = time.monotonic()
    img = asyncio.run(template_store.ensure("base"))
    took = time.monotonic() - t0
    print(
        f"\n[images] template base ready in {took:.1f}s "
        f"({'built' if template_store.stats.conversions else 'cached'})"
    )
    return img


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store", StoreConfig(auth_file=None))


# ---- reading ext4 images without mounting ------------------------------------------------


def debugfs(image: Path, request: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, errors="replace"
    )
    return out.stdout


def ext4_cat(image: Path, path: str) -> str:
    return debugfs(image, f"cat {path}")


@dataclass
class Ext4Stat:
    kind: str
    mode: int
    uid: int
    gid: int
    links: int
    inode: int
    raw: str


def ext4_stat(image: Path, path: str) -> Ext4Stat | None:
    raw = debugfs(image, f"stat {path}")
    m = re.search(r"Inode: (\d+)\s+Type: (.+?)\s+Mode:\s+(\d+)", raw)
    if not m:
        return None
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", raw)
    ln = re.search(r"Links: (\d+)", raw)
    assert u and ln
    return Ext4Stat(
        m.group(2),
        int(m.group(3), 8),
        int(u.group(1)),
        int(u.group(2)),
        int(ln.group(1)),
        int(m.group(1)),
        raw,
    )


def ext4_ls(image: Path, path: str) -> list[str]:
    raw = debugfs(image, f"ls -p {path}")
    names = []
    for line in raw.splitlines():
        parts = line.strip("/").split("/")
        if len(parts) >= 5 and parts[4] not in (".", ".."):
            names.append(parts[4])
    return sorted(names)


def assert_store_intact(store: ImageStore) -> None:
    """No half image anywhere: every images/ entry loads, and no build dir is left over."""
    for d in (store.root / "images").iterdir():
        assert (d / "image.json").is_file() and (d / "rootfs.ext4").is_file(), d
    leftovers = [p.name for p in (store.root / "tmp").iterdir()]
    assert leftovers == [], leftovers
    for img in store.list():
        assert ext4_stat(img.rootfs, "/") is not None
