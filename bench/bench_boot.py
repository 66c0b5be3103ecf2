"""Boot to agent-ready vs bare QEMU booting the same kernel to a trivial init.

Both sides run in the same process, interleaved, on the same kernel and QEMU flags:
- baseline: QEMU with our kernel and an initramfs whose /init is a static program that
  prints READY on the serial console (no disks, no jail, no agent);
- isorun: MicroVM.boot() with the busybox rootfs (jail, cgroup, two disks, overlay root,
  agent answering hello) and MicroVM.boot() without a rootfs.
Prints JSON lines and the ratio of medians. Under TCG here; never a KVM number.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from vmhelpers import build_busybox_rootfs

from isorun.vmm import MicroVM, VMSpec, accel, artifacts, qemu_cmd

RUNS = int(os.environ.get("BENCH_RUNS", "7"))
TRIVIAL_INIT = """package main
import "os"
func main() { os.Stdout.Write([]byte("READY\\n")); select {} }
"""


def trivial_initramfs(work: Path) -> Path:
    src = work / "src"
    src.mkdir()
    (src / "main.go").write_text(TRIVIAL_INIT)
    (src / "go.mod").write_text("module trivial\ngo 1.21\n")
    root = work / "root"
    (root / "dev").mkdir(parents=True)
    env = {**os.environ, "CGO_ENABLED": "0"}
    subprocess.run(["go", "build", "-o", str(root / "init"), "."], cwd=src, env=env, check=True)
    subprocess.run(["mknod", "-m", "600", str(root / "dev/console"), "c", "5", "1"], check=True)
    out = work / "trivial.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(out, "wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc"],
            cwd=root,
            input=files,
            stdout=f,
            stderr=subprocess.DEVNULL,
            check=True,
        )
    return out


def bare_boot(kernel: Path, initramfs: Path, accel_name: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        lsock = socket.socket(socket.AF_UNIX)
        path = f"{tmp}/console.sock"
        lsock.bind(path)
        lsock.listen(1)
        accel_arg = "kvm" if accel_name == "kvm" else f"tcg,tb-size={qemu_cmd.TCG_TB_MIB}"
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [
                artifacts.qemu_binary(),
                "-M",
                "microvm,pit=on,pic=on,rtc=on,isa-serial=on,acpi=off",
                "-accel",
                accel_arg,
                "-cpu",
                "host" if accel_name == "kvm" else "max",
                "-m",
                "256M",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-no-reboot",
                "-kernel",
                str(kernel),
                "-initrd",
                str(initramfs),
                "-append",
                qemu_cmd.kernel_cmdline(False, ""),
                "-chardev",
                f"socket,id=c,fd={lsock.fileno()},server=on,wait=off",
                "-serial",
                "chardev:c",
            ],
            pass_fds=[lsock.fileno()],
        )
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.settimeout(30)
        buf = b""
        while b"READY" not in buf:
            data = c.recv(4096)
            if not data:
                raise RuntimeError("bare QEMU exited before READY")
            buf += data
        elapsed = time.monotonic() - t0
        proc.kill()
        proc.wait()
        return elapsed


AGENT_MS: dict[bool, list[float]] = {True: [], False: []}


async def isorun_boot(rootfs: Path | None) -> float:
    t0 = time.monotonic()
    vm = await MicroVM.boot(VMSpec(rootfs=rootfs, memory_mib=256, scratch_mib=256))
    elapsed = time.monotonic() - t0
    # The agent's own clock from its start (PID 1 exec) to answering hello: the part of the
    # gap to the bare boot that the guest agent spends (mounts, finding its port).
    boot_ms = vm.agent.conn.hello.get("boot_ms")
    if isinstance(boot_ms, int | float):
        AGENT_MS[rootfs is not None].append(float(boot_ms))
    await vm.kill()
    return elapsed


def summary(name: str, xs: list[float]) -> dict[str, object]:
    xs = sorted(xs)
    return {
        "name": name,
        "runs": len(xs),
        "median_s": round(statistics.median(xs), 3),
        "min_s": round(xs[0], 3),
        "max_s": round(xs[-1], 3),
    }


async def main() -> None:
    kernel = artifacts.kernel_path()
    choice = accel.detect()
    rootfs = build_busybox_rootfs()
    with tempfile.TemporaryDirectory() as tmp:
        trivial = trivial_initramfs(Path(tmp))
        bare, full, noroot = [], [], []
        await isorun_boot(rootfs)  # warm caches (scratch template, page cache)
        for _ in range(RUNS):
            bare.append(bare_boot(kernel, trivial, choice.name))
            full.append(await isorun_boot(rootfs))
            noroot.append(await isorun_boot(None))
    rows = [
        summary("bare_qemu_trivial_init", bare),
        summary("isorun_boot_rootfs", full),
        summary("isorun_boot_initramfs_only", noroot),
    ]
    for r in rows:
        print(json.dumps({"accel": choice.name, **r}))
    base = statistics.median(bare)
    print(
        json.dumps(
            {
                "accel": choice.name,
                "ratio_rootfs_vs_bare": round(statistics.median(full) / base, 3),
                "ratio_initramfs_only_vs_bare": round(statistics.median(noroot) / base, 3),
                "agent_start_to_ready_ms_rootfs": statistics.median(AGENT_MS[True] or [0.0]),
                "agent_start_to_ready_ms_initramfs_only": statistics.median(
                    AGENT_MS[False] or [0.0]
                ),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
