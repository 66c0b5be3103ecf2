"""Helpers for tests that boot real guests: a busybox root filesystem built from Debian's
busybox-static, VM specs sized for tests, and the leak check every VM test ends with."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from isorun.vmm import MicroVM, VMSpec, artifacts

BUSYBOX = Path("/bin/busybox")
PASSWD = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
GROUP = "root:x:0:\nuser:x:1000:\n"


def build_busybox_rootfs() -> Path:
    """A tiny ext4 image: busybox and its applet links, /etc/passwd with a non-root user."""
    if not BUSYBOX.is_file():
        raise RuntimeError("/bin/busybox missing: apt-get install busybox-static")
    digest = hashlib.sha256(BUSYBOX.read_bytes() + PASSWD.encode() + b"v3").hexdigest()[:16]
    out = artifacts.cache_root() / "test-rootfs" / f"busybox-{digest}.ext4"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "etc", "root", "home/user", "tmp", "proc", "sys", "dev", "run"):
            (root / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        applets = subprocess.run(
            [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for name in applets:
            if name != "busybox":
                (root / "bin" / name).symlink_to("busybox")
        (root / "etc/passwd").write_text(PASSWD)
        (root / "etc/group").write_text(GROUP)
        os.chown(root / "home/user", 1000, 1000)
        (root / "tmp").chmod(0o1777)
        # a name of this build's own, renamed into place: two test sessions on one machine
        # build at once, and a shared temp name made one fail or cache a mixed image
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        tmp_img = Path(name)
        try:
            subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", str(root), name, "64M"],
                check=True,
            )
            tmp_img.chmod(0o644)
            tmp_img.replace(out)
        finally:
            tmp_img.unlink(missing_ok=True)
    return out


def vm_spec(rootfs: Path | None, **kw: object) -> VMSpec:
    spec = VMSpec(rootfs=rootfs, memory_mib=256, scratch_mib=256)
    for k, v in kw.items():
        setattr(spec, k, v)
    return spec


def assert_vm_gone(vm: MicroVM) -> None:
    assert not vm.run_dir.exists(), f"{vm.run_dir} left behind"
    for f in vm.cgroup.procs_files():
        assert not f.parent.exists(), f"cgroup {f.parent} left behind"
    if vm.pid is not None:
        assert not Path(f"/proc/{vm.pid}").exists() or _is_zombie(vm.pid)


def _is_zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True


def qemu_pids_for(under: Path) -> list[int]:
    """Live QEMU processes (and their jail wrappers) whose command line names a path under
    `under`: a VM's disks and jail live in its state directory."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if str(under).encode() in cmd and b"qemu" in cmd:
            pids.append(int(p.name))
    return pids
