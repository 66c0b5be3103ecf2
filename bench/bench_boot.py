"""Boot to agent-ready vs bare QEMU booting the same kernel to a trivial init.

Both sides run in the same process, interleaved, on the same kernel and QEMU flags:
- baselines: QEMU with our kernel and an initramfs whose /init is a static program that
  prints READY on the serial console (no disks, no jail, no agent): one in Go (the agent's
  language, so the ratio shows what isorun adds beyond starting a Go program) and one in C
  (the smallest init there is: the Go runtime's own start-up is then on isorun's side);
- isorun: MicroVM.boot() with the busybox rootfs (jail, cgroup, two disks, overlay root,
  agent answering hello) and MicroVM.boot() without a rootfs; the rootfs boot is also timed
  on to its first command's result (`true`), which is what a user waits for;
- isorun warm start: MicroVM.boot(warm_start=True) with the same rootfs, which restores a
  booted template of the machine (made in the warm-up unless cached; the first warm start's
  time is printed) and mounts the
  rootfs in it: the same VM a user gets, without running the kernel's boot; against
  DESIGN.md §5's floor for it, plain QEMU restoring the same template with the same disks
  until its agent answers (no jail, cgroup, reseed, clock or root mount).
Then, in one more booted guest, the agent's two main root mounts done again
(`root_mounts_again_ms`): what they cost once TCG has translated their kernel code.
Prints JSON lines, the ratios of medians and each side's split of its boot (medians, ms):
bare: the guest's uptime when its init ran (`kernel_to_init`) and the rest (`outside_guest`:
QEMU's start); isorun: the guest's uptime when the agent started, then ms from its start to
each step and to `hello`, and the rest (`outside_guest`: QEMU's start and the host's jail,
cgroup, scratch disk and connecting). Under TCG here; never a KVM
number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from vmhelpers import build_busybox_rootfs

from isorun.agent.mux import AgentConnection
from isorun.vmm import MicroVM, VMSpec, artifacts, qemu_cmd, scratch, tsc
from isorun.vmm import warm as warm_mod
from isorun.vmm.qmp import QMPMonitor

RUNS = int(os.environ.get("BENCH_RUNS", "7"))
# Each prints READY and the guest's uptime (CLOCK_MONOTONIC: ms since the kernel started)
# when it runs, so a boot splits into the kernel's part and the part outside the guest.
TRIVIAL_GO_INIT = """package main
import ("os"; "strconv"; "syscall"; "unsafe")
func main() {
	var ts syscall.Timespec
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1, uintptr(unsafe.Pointer(&ts)), 0)
	ms := strconv.FormatInt(ts.Sec*1000+ts.Nsec/1000000, 10)
	os.Stdout.Write([]byte("READY " + ms + "\\n"))
	select {}
}
"""
TRIVIAL_C_INIT = """#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(void) {
	struct timespec t; char b[64];
	clock_gettime(CLOCK_MONOTONIC, &t);
	int n = snprintf(b, sizeof b, "READY %ld\\n", (long)(t.tv_sec * 1000 + t.tv_nsec / 1000000));
	write(1, b, n);
	for (;;) pause();
}
"""


def trivial_initramfs(work: Path, lang: str) -> Path:
    src = work / f"src-{lang}"
    src.mkdir()
    root = work / f"root-{lang}"
    (root / "dev").mkdir(parents=True)
    if lang == "go":
        (src / "main.go").write_text(TRIVIAL_GO_INIT)
        (src / "go.mod").write_text("module trivial\ngo 1.21\n")
        env = {**os.environ, "CGO_ENABLED": "0"}
        build = ["go", "build", "-o", str(root / "init"), "."]
        subprocess.run(build, cwd=src, env=env, check=True)
    else:
        (src / "init.c").write_text(TRIVIAL_C_INIT)
        build = ["cc", "-static", "-O2", "-o", str(root / "init"), str(src / "init.c")]
        subprocess.run(build, check=True)
    subprocess.run(["mknod", "-m", "600", str(root / "dev/console"), "c", "5", "1"], check=True)
    out = work / f"trivial-{lang}.cpio"
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


def bare_boot(kernel: Path, initramfs: Path, accel_name: str, lang: str) -> float:
    # the same command line as isorun's, TSC rate included (vmm/tsc.py)
    tsc_khz = None if accel_name == "kvm" else tsc.host_tsc_khz()
    with tempfile.TemporaryDirectory() as tmp:
        lsock = socket.socket(socket.AF_UNIX)
        path = f"{tmp}/console.sock"
        lsock.bind(path)
        lsock.listen(1)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [
                *qemu_cmd.machine_args(
                    artifacts.qemu_binary(), accel_name, 1, 256, kernel, initramfs
                ),
                "-append",
                qemu_cmd.kernel_cmdline(False, "", accel_name, tsc_khz=tsc_khz),
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
        while (ready := re.search(rb"READY (\d+)\r?\n", buf)) is None:
            data = c.recv(4096)
            if not data:
                raise RuntimeError("bare QEMU exited before READY")
            buf += data
        elapsed = time.monotonic() - t0
        proc.kill()
        proc.wait()
        uptime_ms = float(ready.group(1))
        wall_ms = elapsed * 1000
        BARE_SPLIT[lang].append(
            {"wall_ms": wall_ms, "kernel_to_init": uptime_ms, "outside_guest": wall_ms - uptime_ms}
        )
        return elapsed


# Per bare run: wall time, the guest's uptime when init ran, and the rest (QEMU's start).
BARE_SPLIT: dict[str, list[dict[str, float]]] = {"go": [], "c": []}


async def bare_restore(template: Path, rootfs: Path, scratch_disk: Path, accel_name: str) -> float:
    """DESIGN.md §5's floor for a warm start: plain QEMU restoring the same template with the
    same disks (no jail, cgroup or seccomp; sockets and files ready beforehand), resumed once
    loaded, until its agent answers hello; no reseed, clock or root mount after."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        socks: dict[str, socket.socket] = {}
        for name in ("agent", "qmp", "console"):
            socks[name] = stack.enter_context(socket.socket(socket.AF_UNIX))
            socks[name].bind(f"{tmp}/{name}.sock")
            socks[name].listen(1)

        def opened(path: Path, mode: int) -> int:
            fd = os.open(path, mode | os.O_CLOEXEC)
            stack.callback(os.close, fd)
            return fd

        state = opened(template, os.O_RDONLY)
        disks = {
            "root": [opened(rootfs, os.O_RDONLY)],
            "scratch": [opened(scratch_disk, os.O_RDONLY), opened(scratch_disk, os.O_RDWR)],
        }
        files = qemu_cmd.LaunchFiles(
            kernel=artifacts.kernel_path(),
            initramfs=artifacts.initramfs_path(),
            rootfs=rootfs,
            scratch=scratch_disk,
            agent_fd=socks["agent"].fileno(),
            qmp_fd=socks["qmp"].fileno(),
            console_fd=socks["console"].fileno(),
            root_on_cmdline=False,
            incoming_fd=state,
            disk_fds=disks,
        )
        argv = qemu_cmd.build(artifacts.qemu_binary(), accel_name, 1, 256, files, sandbox=False)
        pass_fds = [s.fileno() for s in socks.values()] + [state, *disks["root"], *disks["scratch"]]
        qmp = QMPMonitor()

        async def resume() -> None:
            await qmp.connect(Path(f"{tmp}/qmp.sock"))
            while await qmp.status() == "inmigrate":
                await asyncio.sleep(0.005)
            await qmp.execute("cont")

        t0 = time.monotonic()
        proc = subprocess.Popen(argv, pass_fds=pass_fds)
        for sock in socks.values():
            sock.close()  # QEMU's copies serve; ours would hide its exit from a connect
        try:
            async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
                tg.create_task(resume())
                hello = tg.create_task(AgentConnection.open_unix(f"{tmp}/agent.sock", 30))
            elapsed = time.monotonic() - t0
            await hello.result().close()
        except Exception as exc:
            rc = proc.poll()
            raise RuntimeError(f"bare restore of {template} failed (QEMU exit {rc})") from exc
        finally:
            await qmp.close()
            proc.kill()
            proc.wait()
        return elapsed


# The agent's own account of its boot, per run: {"boot_ms": …, "agent_start_uptime": …, …}
AGENT_PHASES: dict[bool, list[dict[str, float]]] = {True: [], False: []}
# Boot and then the first command's result: what a user waits for (the guest's first exec
# translates the exec path under TCG, so the first is dearer than any later one).
FIRST_EXEC: dict[bool, list[float]] = {False: [], True: []}  # by warm start


async def isorun_boot(rootfs: Path | None, warm: bool = False) -> float:
    t0 = time.monotonic()
    spec = VMSpec(rootfs=rootfs, memory_mib=256, scratch_mib=256, warm_start=warm)
    vm = await MicroVM.boot(spec)
    elapsed = time.monotonic() - t0
    if warm and not vm.restored:
        await vm.kill()
        raise RuntimeError("a warm start booted cold (see the log): its figures would be wrong")
    if rootfs is not None:  # the initramfs alone has no `true`
        result = await vm.agent.exec(argv=["true"])
        if result.exit_code != 0:
            raise RuntimeError(f"first exec of `true` failed: {result}")
        FIRST_EXEC[warm].append(time.monotonic() - t0)
    hello = vm.agent.conn.hello
    phases = hello.get("boot_phases_ms")
    # a restored guest reports the template's boot
    if not warm and isinstance(hello.get("boot_ms"), int | float) and isinstance(phases, dict):
        row = {k: float(v) for k, v in phases.items() if isinstance(v, int | float)}
        row["hello"] = float(hello["boot_ms"])
        # the rest: the host's part (jail, cgroup, scratch disk, connecting) and QEMU's start
        row["wall_ms"] = elapsed * 1000
        row["outside_guest"] = row["wall_ms"] - row.get("agent_start_uptime", 0) - row["hello"]
        AGENT_PHASES[rootfs is not None].append(row)
    await vm.kill()
    return elapsed


# The agent's root setup done again in a booted guest, each step as its own command,
# less a `true` (the same busybox, so fork, exec and the round trip cancel out). Under
# TCG a kernel path's first run is mostly translation: these show what the same mounts
# cost once translated, against the boot's `root` phase (first run).
AGAIN_STEPS = {
    "image_ext4_ro": [
        "mount",
        "-t",
        "ext4",
        "-o",
        "ro,no_prefetch_block_bitmaps",
        "/dev/vda",
        "/tmp/again/image",
    ],
    "overlay": [
        "mount",
        "-t",
        "overlay",
        "-o",
        "lowerdir=/tmp/again/image,upperdir=/.isorun/scratch/again/upper,"
        "workdir=/.isorun/scratch/again/work,redirect_dir=on",
        "overlay",
        "/tmp/again/root",
    ],
}


async def root_mounts_again(rootfs: Path) -> dict[str, float]:
    vm = await MicroVM.boot(VMSpec(rootfs=rootfs, memory_mib=256, scratch_mib=256))
    try:
        mkdir = [
            "mkdir",
            "-p",
            "/tmp/again/image",
            "/tmp/again/root",
            "/.isorun/scratch/again/upper",
            "/.isorun/scratch/again/work",
        ]
        if (await vm.agent.exec(argv=mkdir)).exit_code != 0:
            raise RuntimeError("mkdir for the repeated mounts failed")

        async def timed(argv: list[str]) -> float:
            t0 = time.monotonic()
            result = await vm.agent.exec(argv=argv)
            if result.exit_code != 0:
                raise RuntimeError(f"{argv} failed: {result}")
            return (time.monotonic() - t0) * 1000

        true_ms = statistics.median([await timed(["true"]) for _ in range(9)])
        row = {name: round(await timed(argv) - true_ms, 1) for name, argv in AGAIN_STEPS.items()}
        row["true_round_trip"] = round(true_ms, 1)
        return row
    finally:
        await vm.kill()


def phase_medians(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: round(statistics.median([r[k] for r in rows if k in r]), 1) for k in keys}


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
    choice = MicroVM.accel_for(VMSpec())  # what MicroVM.boot chooses (KVM probe included)
    rootfs = build_busybox_rootfs()
    with tempfile.TemporaryDirectory() as tmp:
        trivial_go = trivial_initramfs(Path(tmp), "go")
        trivial_c = trivial_initramfs(Path(tmp), "c")
        bare_go: list[float] = []
        bare_c: list[float] = []
        full: list[float] = []
        noroot: list[float] = []
        warm: list[float] = []
        restore: list[float] = []
        await isorun_boot(rootfs)  # warm caches (scratch template, page cache)
        key = warm_mod.template_key(
            artifacts.qemu_binary(), kernel, artifacts.initramfs_path(), choice.name, 1, 256
        )
        template_cached = warm_mod.template_path(key).is_file()
        first_warm_s = await isorun_boot(rootfs, warm=True)  # makes the template if need be
        if not warm_mod.template_path(key).is_file():
            raise RuntimeError(f"no warm-start template at {warm_mod.template_path(key)}")
        scratch_disk = Path(tmp) / "scratch.ext4"
        await scratch.make_scratch(scratch_disk, 256)
        FIRST_EXEC[False].clear()
        FIRST_EXEC[True].clear()
        AGENT_PHASES[True].clear()
        for _ in range(RUNS):
            bare_go.append(bare_boot(kernel, trivial_go, choice.name, "go"))
            bare_c.append(bare_boot(kernel, trivial_c, choice.name, "c"))
            full.append(await isorun_boot(rootfs))
            noroot.append(await isorun_boot(None))
            warm.append(await isorun_boot(rootfs, warm=True))
            template = warm_mod.template_path(key)
            restore.append(await bare_restore(template, rootfs, scratch_disk, choice.name))
        again = await root_mounts_again(rootfs)
    rows = [
        summary("bare_qemu_trivial_go_init", bare_go),
        summary("bare_qemu_trivial_c_init", bare_c),
        summary("isorun_boot_rootfs", full),
        summary("isorun_boot_initramfs_only", noroot),
        summary("isorun_boot_rootfs_to_first_exec", FIRST_EXEC[False]),
        summary("isorun_warm_start_rootfs", warm),
        summary("isorun_warm_start_rootfs_to_first_exec", FIRST_EXEC[True]),
        summary("bare_qemu_restore_of_the_template", restore),
    ]
    for r in rows:
        print(json.dumps({"accel": choice.name, **r}))
    go, c = statistics.median(bare_go), statistics.median(bare_c)
    rootfs_s, noroot_s = statistics.median(full), statistics.median(noroot)
    ratios = {
        "ratio_rootfs_vs_bare_go": round(rootfs_s / go, 3),
        "ratio_initramfs_only_vs_bare_go": round(noroot_s / go, 3),
        "ratio_rootfs_vs_bare_c": round(rootfs_s / c, 3),
        "ratio_initramfs_only_vs_bare_c": round(noroot_s / c, 3),
        "ratio_rootfs_first_exec_vs_bare_go": round(statistics.median(FIRST_EXEC[False]) / go, 3),
        "ratio_warm_start_rootfs_vs_bare_go": round(statistics.median(warm) / go, 3),
        "ratio_warm_start_first_exec_vs_bare_go": round(
            statistics.median(FIRST_EXEC[True]) / go, 3
        ),
        # DESIGN.md §5: a warm start vs plain QEMU restoring the same template
        "ratio_warm_start_rootfs_vs_bare_restore": round(
            statistics.median(warm) / statistics.median(restore), 3
        ),
        "warm_first_start_s": round(first_warm_s, 3),
        "warm_template_was_cached": template_cached,
    }
    print(json.dumps({"accel": choice.name, **ratios}))
    for lang in ("go", "c"):
        print(
            json.dumps(
                {"accel": choice.name, "bare_split_ms": lang, **phase_medians(BARE_SPLIT[lang])}
            )
        )
    print(json.dumps({"accel": choice.name, "root_mounts_again_ms": "rootfs", **again}))
    for with_root, name in ((True, "rootfs"), (False, "initramfs_only")):
        print(
            json.dumps(
                {
                    "accel": choice.name,
                    "agent_phases_ms": name,
                    **phase_medians(AGENT_PHASES[with_root]),
                }
            )
        )


if __name__ == "__main__":
    asyncio.run(main())
