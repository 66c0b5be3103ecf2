"""One microVM: launch QEMU jailed, connect QMP and the agent, supervise, clean up.

Boot: the host creates the listening unix sockets itself and hands their fds to QEMU, so
it can connect at once (the kernel queues the connection) instead of polling for files.
Agent-ready is the moment the agent answers `hello`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isorun.agent import AgentClient, AgentConnection
from isorun.agent.mux import STREAM_LIMIT
from isorun.errors import (
    BootTimeout,
    ChannelClosedError,
    ConfigError,
    GuestError,
    IsorunError,
    VMError,
)
from isorun.vmm import accel as accel_mod
from isorun.vmm import artifacts, jail, kvmprobe, qemu_cmd, scratch, tsc, vsock, warm
from isorun.vmm.cgroup import VMCgroup
from isorun.vmm.console import ConsoleLog
from isorun.vmm.mempeak import MemoryPeak
from isorun.vmm.process import VMProcess
from isorun.vmm.qmp import QMPMonitor
from isorun.vmm.rundir import (
    CONSOLE_LOG,
    LABELS_FILE,
    TEMPLATE_VM_PREFIX,
    oom_death_reason,
    remove_dead_template_vms,
    running_pid,
)
from isorun.vmm.spec import VMSpec

# QEMU itself (device emulation, TCG translation cache) needs memory beyond guest RAM.
QEMU_OVERHEAD_MIB = qemu_cmd.TCG_TB_MIB + 192


def qemu_overhead_mib(accel: str, memory_mib: int) -> int:
    """QEMU's memory beyond guest RAM. Under KVM no translation cache, but the kernel's
    page tables and reverse maps of guest memory are charged to the VM's cgroup too: they
    grow with guest RAM (up to a few tenths of a percent of it with 4 KiB mappings)."""
    if accel == "kvm":
        return 192 + memory_mib // 100
    return QEMU_OVERHEAD_MIB


# ... and CPU beyond its vCPU threads: the main loop and I/O threads emulate the devices.
# With a quota of exactly `vcpus` CPUs a TCG boot was throttled in 6-11 of its 8-14 CFS
# periods (cpu.stat), 20-40 ms in all; the bare QEMU we compare against has no quota.
QEMU_CPU_HEADROOM = 0.25

log = logging.getLogger("isorun.vmm")


@dataclass(frozen=True, slots=True)
class _Binaries:
    """What a VM runs: the QEMU binary, guest kernel and initramfs."""

    qemu: str
    kernel: Path
    initramfs: Path

    @classmethod
    def of(cls, spec: VMSpec) -> _Binaries:
        return cls(
            artifacts.qemu_binary(),
            artifacts.kernel_path(spec.kernel),
            artifacts.initramfs_path(spec.initramfs),
        )

    def accel(self, spec: VMSpec) -> accel_mod.AccelChoice:
        """The accelerator these run under: KVM only if it boots this kernel (kvmprobe)."""
        return accel_mod.detect(
            spec.accel, probe=functools.partial(kvmprobe.kvm_boots_a_guest, self.qemu, self.kernel)
        )


@dataclass(frozen=True, slots=True)
class VMUsage:
    cpu_ms: int
    mem_peak_bytes: int
    uptime_ms: int


class MicroVM:
    """A running guest. Create with `await MicroVM.boot(spec)`; end with `shutdown()`/`kill()`."""

    def __init__(
        self,
        vm_id: str,
        spec: VMSpec,
        accel: accel_mod.AccelChoice,
        run_dir: Path | None = None,
        channel: vsock.ChannelChoice | None = None,
    ):
        self.id = vm_id
        self.spec = spec
        self.run_dir = run_dir or spec.runs_dir() / vm_id
        self.accel = accel
        self.channel = channel or vsock.ChannelChoice("serial", "default")
        self.vsock_cid: int | None = None  # set once a vsock channel has its CID
        self.vsock_key: str | None = None  # what its agent admits a vsock peer with
        self.boot_ms: float = 0.0
        self.started_at = time.monotonic()
        self.agent: AgentClient
        self.console = ConsoleLog(self.run_dir / CONSOLE_LOG, on_halt=self._on_guest_halt)
        self.cgroup = VMCgroup(f"vm-{vm_id}")
        self._memory = MemoryPeak(self.cgroup, self.run_dir)
        self._proc: VMProcess | None = None
        self.started_unix = time.time()
        self._qmp = QMPMonitor()
        self._supervisor: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self.death_reason: str | None = None
        self._final_usage: VMUsage | None = None
        self._killing: asyncio.Future[VMUsage] | None = None
        self._shutdown_requested = False
        # The host killed a QEMU still running: its end is that kill, whatever the guest
        # printed before (any guest process can print a panic's text to the console).
        self._killed_by_host = False
        self._detached = False
        self._restored = False  # a warm start got as far as the agent answering
        # Cleanup removes the run dir (and cgroup) only when this VM made it or adopted it:
        # not another VM's whose id this one drew again.
        self._owns_run_dir = run_dir is not None

    # --- boot -----------------------------------------------------------------------

    @classmethod
    async def boot(cls, spec: VMSpec) -> MicroVM:
        spec.validate()
        bins = _Binaries.of(spec)
        choice = await asyncio.to_thread(bins.accel, spec)
        channel = vsock.choose(spec.channel, warm_start=spec.warm_start and _warm_fits(spec))
        if spec.warm_start and _warm_applies(spec, channel):
            vm = await cls._warm_boot(spec, choice, bins)
            if vm is not None:
                return vm
        try:
            return await cls._boot_on(spec, choice, channel, bins)
        except (VMError, ConfigError) as exc:
            # vsock that auto chose but the host or QEMU cannot set up: virtio-serial, which
            # every VM has
            why = _vsock_failure(str(exc)) if not channel.required else None
            if channel.name != "vsock" or why is None:
                raise
            log.warning("vsock did not start (%s): booting over virtio-serial", why)
            serial = vsock.ChannelChoice("serial", f"auto: vsock did not start: {why}")
            return await cls._boot_on(spec, choice, serial, bins)

    @classmethod
    async def _boot_on(
        cls,
        spec: VMSpec,
        choice: accel_mod.AccelChoice,
        channel: vsock.ChannelChoice,
        bins: _Binaries,
    ) -> MicroVM:
        try:
            return await cls._boot_retrying(spec, choice, channel, bins)
        except VMError as exc:
            # KVM chosen by detection (not asked for) that QEMU cannot set up: TCG, as it
            # would have been chosen had the device said so
            why = accel_mod.kvm_init_failure(str(exc)) if choice.name == "kvm" else None
            if why is None or choice.reason == "requested":
                raise
            log.warning("QEMU could not use KVM (%s): booting under TCG from now on", why)
            tcg = accel_mod.fall_back_to_tcg(why)
            return await cls._boot_retrying(spec, tcg, channel, bins)

    @classmethod
    async def _boot_retrying(
        cls,
        spec: VMSpec,
        choice: accel_mod.AccelChoice,
        channel: vsock.ChannelChoice,
        bins: _Binaries,
        template_scratch: Path | None = None,
    ) -> MicroVM:
        """Boot a new VM; one that hangs is retried with a fresh VM (DESIGN.md §4: ~1 PVH
        boot in 13), up to spec.boot_attempts."""
        last: IsorunError | None = None
        for _ in range(spec.boot_attempts):
            vm_id = uuid.uuid4().hex[:12]
            if template_scratch is not None:  # as long as any other: socket paths are bounded
                vm_id = TEMPLATE_VM_PREFIX + vm_id[len(TEMPLATE_VM_PREFIX) :]
            vm = cls(vm_id, spec, choice, channel=channel)
            try:
                await vm._launch(bins, template_scratch=template_scratch)
                return vm
            except BootTimeout as exc:
                last = exc
                await vm.kill()
            except BaseException:
                await vm.kill()
                raise
        assert last is not None
        raise last

    @classmethod
    async def adopt(cls, run_dir: Path, timeout: float = 10.0) -> MicroVM:
        """Take over a VM that an earlier host process started (e.g. before a daemon
        restart): reconnect its console, QMP and agent; supervise its pid."""
        try:
            state = json.loads((run_dir / "vm.json").read_text())
            vm_id = str(state["id"])
            spec = VMSpec(
                rootfs=Path(state["rootfs"]) if state.get("rootfs") else None,
                vcpus=int(state["vcpus"]),
                memory_mib=int(state["memory_mib"]),
                scratch_mib=int(state.get("scratch_mib", 2048)),
                labels=dict(state.get("labels") or {}),
            )
            accel = accel_mod.AccelChoice(str(state["accel"]), "adopted")
            channel = vsock.ChannelChoice(
                str(state.get("channel", "serial")),
                "adopted",
                required=bool(state.get("channel_required", False)),
            )
            cid = state.get("vsock_cid")
            key = state.get("vsock_key")
            started_unix = float(state.get("started_unix", time.time()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VMError(f"cannot adopt {run_dir}: unreadable vm.json ({exc})", "gone") from exc
        pid = running_pid(run_dir)
        if pid is None:
            raise VMError(f"VM {vm_id} is no longer running", "gone")
        vm = cls(vm_id, spec, accel, run_dir, channel)
        vm.vsock_cid = int(cid) if channel.name == "vsock" and cid is not None else None
        vm.vsock_key = str(key) if vm.vsock_cid is not None and key else None
        vm.started_unix = started_unix
        vm.started_at = time.monotonic() - max(0.0, time.time() - started_unix)
        vm._proc = VMProcess(pid)
        vm._supervisor = asyncio.create_task(vm._supervise(), name=f"vm:{vm.id}")
        try:
            console_r, console_w = await asyncio.open_unix_connection(str(run_dir / "console.sock"))
            vm.console.start(console_r, console_w)
            try:
                # QEMU serves one QMP client at a time: a second one waits, unanswered.
                await asyncio.wait_for(vm._qmp.connect(run_dir / "qmp.sock"), timeout)
            except TimeoutError as exc:
                raise VMError(
                    f"VM {vm_id}: QEMU's QMP monitor did not answer within {timeout:g} s "
                    "(is another process connected to it?)",
                    "qmp",
                ) from exc
            try:
                conn = await _reconnect_agent(vm._open_agent, timeout)
            except VMError:
                if await vm._halted_for_good():
                    raise VMError(
                        f"VM {vm_id}: its guest powered off (halted) while no host process "
                        "was attached",
                        "halted",
                    ) from None
                raise
        except BaseException:
            vm._supervisor.cancel()
            await vm._qmp.close()
            await vm.console.stop()
            raise
        vm.agent = AgentClient(conn)
        return vm

    @classmethod
    async def prepare_warm_start(cls, spec: VMSpec) -> Path | None:
        """Make the warm-start template of spec's machine shape now (if it is not made yet),
        so that the first warm start of that shape does not wait for it: a daemon does this
        when it starts. spec.rootfs is not used. The template's path, or None when none
        could be made (logged; warm starts of that shape then boot cold)."""
        spec.validate()
        bins = _Binaries.of(spec)
        if vsock.choose(spec.channel, warm_start=True).name != "serial":
            return None  # such VMs boot cold (_warm_applies)
        # no boot waits for it here: wait out another process making it
        choice = await asyncio.to_thread(bins.accel, spec)
        return await cls._warm_template(spec, choice, bins, None)

    @classmethod
    def accel_for(cls, spec: VMSpec) -> accel_mod.AccelChoice:
        """The accelerator spec's VMs boot under. On a host where KVM looks usable the first
        call per process boots a test guest under it (kvmprobe) and blocks meanwhile."""
        return _Binaries.of(spec).accel(spec)

    @classmethod
    def warm_template_ready(cls, spec: VMSpec) -> bool:
        """Whether a warm start of spec would restore a template already made, rather than
        make one first or boot cold: a caller that cannot wait for a template boot (a
        daemon's create) boots cold otherwise, and has it made meanwhile."""
        try:
            bins = _Binaries.of(spec)
            if not _warm_applies(spec, vsock.choose(spec.channel, warm_start=True)):
                return False
            path = warm.template_path(_template_key(spec, bins.accel(spec), bins))
            return path.is_file() and not warm.failed_recently(path, "restore")
        except (IsorunError, OSError):
            return False

    @classmethod
    async def _warm_template(
        cls,
        spec: VMSpec,
        choice: accel_mod.AccelChoice,
        bins: _Binaries,
        wait_s: float | None,
    ) -> Path | None:
        """The template of spec's shape, or None when there is none to use: it could not be
        made, another process has been making it for longer than wait_s, or it failed
        recently here (warm.RETRY_AFTER_S)."""

        async def make(dest: Path) -> None:
            log.info(
                "warm start: making the template for %d vCPU, %d MiB", spec.vcpus, spec.memory_mib
            )
            await cls._save_template(spec, choice, bins, dest)

        try:
            key = _template_key(spec, choice, bins)
        except OSError as exc:
            log.warning("warm start: %s; booting cold", exc)
            return None
        path = warm.template_path(key)
        if warm.failed_recently(path, "restore"):
            return None
        try:
            got = await warm.ensure_template(
                key, make, lambda: not warm.failed_recently(path, "make"), wait_s
            )
            return got[0] if got is not None else None
        except (IsorunError, OSError) as exc:
            warm.note_failure(path, "make")
            log.warning(
                "warm start: no template (%s); booting cold, not making one again for %.0f min",
                exc,
                warm.RETRY_AFTER_S / 60,
            )
            return None

    @classmethod
    async def _warm_boot(
        cls,
        spec: VMSpec,
        choice: accel_mod.AccelChoice,
        bins: _Binaries,
    ) -> MicroVM | None:
        """Restore this machine shape's template (making it first if need be), or None
        when no template can be made or restored: the caller then boots cold."""
        # Another process making it normally takes ~1 s; past a boot timeout, boot cold.
        template = await cls._warm_template(spec, choice, bins, spec.boot_timeout)
        if template is None:
            return None
        try:
            # Opened once, here: another process may discard or prune the path meanwhile.
            state_fd = os.open(template, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("warm start: %s; booting cold", exc)
            return None
        # Made by this process (here, or in the background) and never restored yet: if it
        # does not load, the next one made the same way would not either.
        fresh = warm.untried(os.fstat(state_fd))
        try:
            serial = vsock.ChannelChoice("serial", "warm start")
            vm = cls(uuid.uuid4().hex[:12], spec, choice, channel=serial)
            try:
                await vm._launch(bins, restore_from=state_fd)
                warm.mark_used(state_fd)
                return vm
            except (VMError, BootTimeout, ChannelClosedError) as exc:
                load_failed, why = vm._load_failed(), vm._stderr_tail()  # before kill's cleanup
                await vm.kill()
                if isinstance(exc, VMError) and exc.reason == "root":
                    raise  # the user's image, not the template: a cold boot would not help
                refused = isinstance(exc, VMError) and exc.reason == "restore"
                if vm._restored and not refused:
                    # The template did its part (its agent answered): what failed came after,
                    # the user's image or a slow host; not the template's fault.
                    log.warning("warm start failed after the restore (%s); booting cold", exc)
                elif load_failed and not fresh:
                    # QEMU refused the file, damaged since it was made: a new one at once.
                    log.warning("warm start: %s did not restore: %s", template, why.strip())
                    warm.discard(template, os.fstat(state_fd))
                else:
                    # A template just made that does not load, a restore that fails before
                    # its agent answers, or one whose agent refuses the reseed or the clock,
                    # would fail the same way on the next boot.
                    if load_failed:
                        warm.discard(template, os.fstat(state_fd))
                    warm.note_failure(template, "restore")
                    log.warning(
                        "warm start: %s did not restore (%s); booting cold, not restoring it "
                        "again for %.0f min",
                        template,
                        why.strip() if load_failed else exc,
                        warm.RETRY_AFTER_S / 60,
                    )
                return None
            except BaseException:
                await vm.kill()
                raise
        finally:
            os.close(state_fd)

    @classmethod
    async def _save_template(
        cls,
        spec: VMSpec,
        choice: accel_mod.AccelChoice,
        bins: _Binaries,
        dest: Path,
    ) -> None:
        """Boot the template guest (our kernel and agent only, no user input: unjailed) with
        placeholder disks it does not mount, and save its state to dest once it answers."""
        remove_dead_template_vms(spec.runs_dir())
        work = dest.with_suffix(".work")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            disks = [work / "image.img", work / "scratch.img"]  # QEMU locks each file
            for disk in disks:
                with open(disk, "wb") as f:
                    f.truncate(warm.PLACEHOLDER_BYTES)
            tspec = dataclasses.replace(
                spec, rootfs=disks[0], jail=False, extra_cmdline="", warm_start=False
            )
            serial = vsock.ChannelChoice("serial", "warm template")
            vm = await cls._boot_retrying(tspec, choice, serial, bins, template_scratch=disks[1])
            try:
                # The guest keeps serving; its restored copies each get a new host end.
                await vm.agent.conn.close()
                await vm._qmp.execute("stop")
                await vm._qmp.execute("migrate", {"uri": f"file:{dest}"})
                deadline = time.monotonic() + spec.boot_timeout
                while time.monotonic() < deadline:
                    info = await vm._qmp.execute("query-migrate")
                    status = info.get("status")
                    if status == "completed":
                        break
                    if status in ("failed", "cancelled"):
                        why = str(info.get("error-desc") or status)[:300]
                        raise VMError(f"saving the warm-start template to {dest}: {why}", "qmp")
                    await asyncio.sleep(0.01)
                else:
                    raise VMError("saving the warm-start template did not finish", "qmp")
            finally:
                await vm.kill()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def detach(self) -> None:
        """Let go of the VM without stopping it: it keeps running for a later `adopt`."""
        self._detached = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        conn = getattr(self, "agent", None)
        if conn is not None:
            await conn.conn.close()
        await self._qmp.close()
        await self.console.stop()

    async def _tsc_khz(self) -> int | None:
        """The host's TSC rate for a TCG guest's clock (vmm/tsc.py); KVM has kvm-clock. A
        restored guest keeps its template's, measured on this same host."""
        if self.accel.name == "kvm":
            return None
        return await asyncio.to_thread(tsc.host_tsc_khz)

    async def _launch(
        self,
        bins: _Binaries,
        restore_from: int | None = None,
        template_scratch: Path | None = None,
    ) -> None:
        """Start QEMU and connect. restore_from: an fd of a warm-start template to restore
        instead of booting; template_scratch: boot as a template, this the scratch
        placeholder."""
        t0 = time.monotonic()
        self.started_at = t0
        self.run_dir.mkdir(parents=True, exist_ok=False, mode=0o700)
        self._owns_run_dir = True
        # Its scratch disk holds what the sandbox wrote, its console what it printed: no
        # other local user may read them (mode set outright: mkdir's is cut by the umask).
        # QEMU opens what it needs here as root, before it drops to its own user.
        os.chmod(self.run_dir, 0o700)
        if self.spec.labels:
            # Before anything else: a host process that dies from here on leaves a run dir
            # its owner (a daemon restarting) can tell is its own, QEMU started or not.
            (self.run_dir / LABELS_FILE).write_text(json.dumps(self.spec.labels))
        scratch_path = template_scratch or self.run_dir / "scratch.ext4"
        if self.spec.rootfs is not None and template_scratch is None:
            await scratch.make_scratch(scratch_path, self.spec.scratch_mib)
        # The host's copies of the fds handed to QEMU: closed on every path, QEMU keeps its own.
        with contextlib.ExitStack() as fds:
            listeners = {
                name: fds.enter_context(_listen(self.run_dir / f"{name}.sock"))
                for name in ("agent", "qmp", "console")
            }
            pass_fds = [s.fileno() for s in listeners.values()]
            lease = vsock.CidLease.reserve() if self.channel.name == "vsock" else None
            if lease is not None:
                fds.callback(lease.close)  # QEMU holds its own copy, and with it the CID
                self.vsock_cid = lease.cid
                self.vsock_key = vsock.new_key()
                pass_fds.append(lease.fd)
            files = qemu_cmd.LaunchFiles(
                kernel=bins.kernel,
                initramfs=bins.initramfs,
                rootfs=self.spec.rootfs,
                scratch=scratch_path,
                agent_fd=listeners["agent"].fileno(),
                qmp_fd=listeners["qmp"].fileno(),
                console_fd=listeners["console"].fileno(),
                vsock_fd=lease.fd if lease else None,
                vsock_cid=lease.cid if lease else None,
                vsock_port=vsock.AGENT_PORT if lease else 0,
                root_on_cmdline=template_scratch is None,
                pidfile=self.run_dir / "qemu.pid",
            )
            if restore_from is not None:

                def hand_over(path: Path, mode: int) -> int:
                    fd = os.open(path, mode | os.O_CLOEXEC)
                    fds.callback(os.close, fd)
                    pass_fds.append(fd)
                    return fd

                rootfs = self.spec.rootfs
                assert rootfs is not None  # warm starts carry one (_warm_applies)
                disk_fds = {
                    "root": [hand_over(rootfs, os.O_RDONLY)],
                    # QEMU opens it read-only while the state loads, then read-write
                    "scratch": [
                        hand_over(scratch_path, os.O_RDONLY),
                        hand_over(scratch_path, os.O_RDWR),
                    ],
                }
                pass_fds.append(restore_from)  # the caller's, closed by the caller
                files = dataclasses.replace(files, incoming_fd=restore_from, disk_fds=disk_fds)
            jailed = self.spec.jail and os.geteuid() == 0
            if self.spec.jail and not jailed:
                _warn_unjailed()
            run_as = jail.qemu_user() if jailed else None
            chroot = jail.empty_root(self.run_dir) if jailed else None
            argv = qemu_cmd.build(
                bins.qemu,
                self.accel.name,
                self.spec.vcpus,
                self.spec.memory_mib,
                files,
                self.spec.extra_cmdline,
                run_as=run_as,
                chroot=chroot,
                tsc_khz=await self._tsc_khz(),
            )
            if jailed:
                argv = jail.namespaced(argv)
            if template_scratch is not None:
                # A template guest is this process's helper: it must not outlive it.
                argv = [artifacts.tool("setpriv", "util-linux"), "--pdeathsig", "KILL", "--", *argv]
            overhead = qemu_overhead_mib(self.accel.name, self.spec.memory_mib)
            mem_limit = (self.spec.memory_mib + overhead) * 1024 * 1024
            procs_files: list[Path] = []
            if os.geteuid() == 0:
                try:
                    self.cgroup.create(mem_limit, self.spec.vcpus + QEMU_CPU_HEADROOM)
                    procs_files = self.cgroup.procs_files()
                except OSError as exc:
                    raise ConfigError(
                        f"cannot create the VM's cgroup under /sys/fs/cgroup: {exc}"
                    ) from exc
            (self.run_dir / "argv.json").write_text(json.dumps(argv))
            self._proc = VMProcess.spawn(argv, self.run_dir / "qemu.stderr", pass_fds, procs_files)
        self._write_state()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"vm:{self.id}")
        try:
            await self._connect(t0, restoring=restore_from is not None)
            if restore_from is None:
                self._check_cold_root()
            if restore_from is not None:
                left = t0 + self.spec.boot_timeout - time.monotonic()
                await asyncio.wait_for(self._settle_restored(), max(0.1, left))
        except (TimeoutError, BootTimeout) as exc:
            raise BootTimeout(
                f"guest did not become ready within {self.spec.boot_timeout:g} s "
                f"(accel {self.accel.name}); console tail:\n{self.console.tail(2000)}",
                "boot-timeout",
            ) from exc
        # what the boot used, kept now: a host process gone in the next second loses none
        self._memory.sample()

    def _check_cold_root(self) -> None:
        """A cold boot whose image did not mount fails naming it, as a warm start does: the
        agent would otherwise serve its initramfs, where every command is "not found"."""
        said = self.agent.conn.hello.get("root_error")
        if said is not None and self.spec.rootfs is not None:
            raise VMError(
                f"root filesystem {self.spec.rootfs} did not mount in the guest: "
                f"{str(said)[:1000]}",
                "root",
            )

    async def _connect(self, t0: float, restoring: bool = False) -> None:
        deadline = t0 + self.spec.boot_timeout
        console_r, console_w = await asyncio.open_unix_connection(
            str(self.run_dir / "console.sock")
        )
        self.console.start(console_r, console_w)
        qmp_task = asyncio.create_task(self._qmp.connect(self.run_dir / "qmp.sock"))
        if restoring:  # the saved guest was stopped: it loads paused
            qmp_task = asyncio.create_task(self._resume_when_loaded(qmp_task))

        hello_task = asyncio.create_task(self._open_agent(max(0.1, deadline - time.monotonic())))
        exited = asyncio.create_task(self._exited.wait())
        try:
            done, _ = await asyncio.wait({hello_task, exited}, return_when=asyncio.FIRST_COMPLETED)
            failed = hello_task in done and hello_task.exception() is not None
            if failed and not isinstance(hello_task.exception(), TimeoutError):
                # The agent stream broke: most often because QEMU itself is going away.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), 2)
            if hello_task not in done or self._exited.is_set():
                raise VMError(
                    f"QEMU exited during boot ({self.death_reason}): {self._stderr_tail()}"
                    f"\nconsole tail:\n{self.console.tail(2000)}",
                    self.death_reason or "qemu-failed",
                )
            self.agent = AgentClient(hello_task.result())
            self.boot_ms = (time.monotonic() - t0) * 1000
            try:
                await asyncio.wait_for(qmp_task, max(0.1, deadline - time.monotonic()))
            except (TimeoutError, OSError, IsorunError) as exc:
                raise VMError(f"QMP monitor did not answer: {exc}", "qmp") from exc
        except BaseException:
            # Failed or cancelled midway: end the helper tasks (and a connection the hello may
            # have opened meanwhile) here, not as stray tasks whose errors no one retrieves.
            await _end_tasks(hello_task, qmp_task, exited)
            if not hasattr(self, "agent") and _result(hello_task) is not None:
                await hello_task.result().close()
            raise
        finally:
            exited.cancel()

    async def _open_agent(self, timeout: float) -> AgentConnection:
        """Connect to the agent over this VM's channel and say hello, within `timeout`."""
        serial_path = str(self.run_dir / "agent.sock")
        cid = self.vsock_cid
        if self.channel.name != "vsock" or cid is None:
            return await AgentConnection.open_unix(serial_path, timeout)

        async def over_vsock(extra: Mapping[str, str], within: float) -> AgentConnection:
            stream = vsock.open_stream(cid, vsock.AGENT_PORT, STREAM_LIMIT, within)
            what = f"the agent at vsock CID {cid} port {vsock.AGENT_PORT}"
            return await AgentConnection.open(stream, what, within, extra)

        if self.vsock_key is None:  # booted by a host from before vsock keys: no key to give
            return await over_vsock({}, timeout)
        over_serial = functools.partial(AgentConnection.open_unix, serial_path)
        conn, fell_back = await vsock.open_keyed(
            over_serial, over_vsock, self.vsock_key, timeout, not self.channel.required
        )
        if fell_back is not None:
            log.warning("VM %s: %s; talking to it over virtio-serial", self.id, fell_back)
            self.channel = vsock.ChannelChoice("serial", fell_back)
            self._write_state()
        return conn

    async def _resume_when_loaded(self, connected: Awaitable[None]) -> None:
        """Once QEMU has loaded the saved state (it exits if it cannot), run the guest: a
        state saved from a stopped guest loads paused."""
        await connected
        while await self._qmp.status() == "inmigrate":
            await asyncio.sleep(0.005)
        await self._qmp.execute("cont")

    async def _settle_restored(self) -> None:
        """Make a restored template this VM's own: fresh randomness first (every copy of
        the template starts from the same CRNG state), the host's clock, then its disks."""
        self._restored = True
        try:
            await self.agent.reseed(os.urandom(64))
            await self.agent.set_clock(time.time_ns())
        except GuestError as exc:
            # The template's agent, not the user's image: boot cold, and do not restore
            # this template again for a while (it would refuse the same way).
            raise VMError(f"the restored guest refused {exc}", "restore") from exc
        try:  # warm starts always carry a rootfs (_warm_applies)
            await self.agent.setup_root("/dev/vda", "/dev/vdb")
        except GuestError as exc:
            raise VMError(
                f"root filesystem {self.spec.rootfs} did not mount in the guest: {exc}", "root"
            ) from exc
        self.boot_ms = (time.monotonic() - self.started_at) * 1000

    def _load_failed(self) -> bool:
        """QEMU exited before the agent answered, saying it could not load the state (or,
        under KVM, could not put the saved registers on this host's CPU)."""
        if self._restored or not self._exited.is_set():
            return False
        said = self._stderr_tail()
        return "load" in said or "put registers" in said

    def _on_guest_halt(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    # --- supervision ---------------------------------------------------------------

    async def _halted_for_good(self) -> bool:
        """Whether every vCPU is halted with interrupts off: how a guest ends that powered
        off (no ACPI on microvm: the kernel halts, and the host, watching the console, ends
        the VM; a host not attached then saw nothing). Nothing but a reset wakes such a CPU,
        and QEMU's register dump is QEMU's, not the guest's, to write."""
        try:
            dump = await asyncio.wait_for(
                self._qmp.execute("human-monitor-command", {"command-line": "info registers -a"}),
                5,
            )
        except Exception:
            return False
        return isinstance(dump, str) and _all_halted(dump)

    async def _supervise(self) -> None:
        assert self._proc is not None
        sampler = asyncio.create_task(self._memory.follow(), name=f"vm-memory:{self.id}")
        try:
            code = await self._proc.wait()
        finally:
            await _end_tasks(sampler)
        try:
            await self._explain_exit(code)
        finally:
            # QEMU is gone, whatever explaining it failed on: waiters must hear so
            if self.death_reason is None:
                self.death_reason = "unknown"
            self._exited.set()
            conn = getattr(self, "agent", None)
            if conn is not None:
                conn.conn.explain_close(
                    ChannelClosedError(f"sandbox VM {self.id} is dead: {self.death_reason}")
                )

    async def _explain_exit(self, code: int | None) -> None:
        """Set death_reason (and the final usage) for a QEMU that exited with `code`."""
        await self.console.drain()  # the last lines (a panic message) may still be in flight
        reason = self._qmp.shutdown_reason
        if self._shutdown_requested:
            self.death_reason = "shutdown"
        elif self.console.halted or reason == "guest-shutdown":
            self.death_reason = "poweroff"
        elif reason == "guest-reset":
            self.death_reason = "panic" if self.console.panicked else "reboot"
        elif reason == "guest-panic":
            self.death_reason = "panic"
        elif reason in ("host-qmp-quit", "host-signal"):
            self.death_reason = "stopped"
        elif oom := oom_death_reason(self.cgroup, self.spec.memory_mib):
            self.death_reason = oom
        elif reason is None and self.console.panicked and not self._our_kill_ended_it(code):
            # QEMU's event came before QMP was connected (an early panic): the console tells
            self.death_reason = "panic"
        elif code is None:
            self.death_reason = "stopped"  # adopted: not our child, no status to read
        elif code < 0:
            self.death_reason = f"killed by signal {-code}"
        else:
            self.death_reason = f"qemu exited with status {code}"
        self._final_usage = self._usage_now()

    def _our_kill_ended_it(self, code: int | None) -> bool:
        return self._killed_by_host and code == -signal.SIGKILL

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._exited.is_set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def restored(self) -> bool:
        """Whether this VM was restored from a warm-start template instead of booted (a warm
        start that could not apply boots cold)."""
        return self._restored

    async def wait(self) -> str:
        """Wait until QEMU has exited; returns why."""
        await self._exited.wait()
        return self.death_reason or "unknown"

    # --- ending ---------------------------------------------------------------------

    async def shutdown(self, timeout: float = 10.0) -> VMUsage:
        """Clean poweroff through the agent; escalate to QMP quit, then SIGKILL."""
        if self.alive:
            if not self._ending_on_its_own():
                self._shutdown_requested = True
            with contextlib.suppress(IsorunError, TimeoutError, OSError):
                await asyncio.wait_for(self.agent.shutdown(), timeout / 2)
            try:
                await asyncio.wait_for(self._exited.wait(), timeout / 2)
            except TimeoutError:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._qmp.execute("quit"), 2)
        return await self.kill()

    def _ending_on_its_own(self) -> bool:
        """The guest or QEMU ended already, its reason still being gathered (the console
        drained for a panic's last lines): a caller that shuts down because its channel just
        broke must not turn a panic, poweroff, reboot or OOM kill into "shutdown". Not the
        console's panic text: any guest process can print that (a halt line ends the VM)."""
        assert self._proc is not None
        return self._proc.gone() or self.console.halted or self._qmp.shutdown_reason is not None

    async def kill(self) -> VMUsage:
        """Stop QEMU now (SIGKILL to its session) and remove every file and group it had.

        Cancelling the caller does not stop the kill half-way: it runs to its end in its
        own task, which concurrent and later calls share."""
        if self._detached:
            raise VMError(f"VM {self.id} was detached from this host process", "detached")
        if self._killing is None:
            self._killing = asyncio.ensure_future(self._kill())
        return await asyncio.shield(self._killing)

    async def _kill(self) -> VMUsage:
        if self._proc is not None:
            self._killed_by_host = not self._proc.gone()
            self._proc.kill()
        if self._owns_run_dir:
            self.cgroup.kill_all()  # whatever left QEMU's process group dies too
        if self._supervisor is not None:
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass  # adopt() may have cancelled it
            except Exception:
                # still clean up: else every later kill() raises this again, and the run
                # dir, cgroup and connections stay
                log.exception("supervising VM %s failed", self.id)
        elif self._proc is not None:
            # A boot that failed between QEMU's start and its supervision (vm.json not
            # written: the state disk full): reap it here, or it stays a zombie.
            await self._proc.wait()
        return await self._cleanup()

    async def _cleanup(self) -> VMUsage:
        """Runs once, from the one `_kill` task that every kill() shares."""
        usage = self._final_usage or self._usage_now()
        try:
            conn = getattr(self, "agent", None)
            if conn is not None:
                await conn.conn.close()
            await self._qmp.close()
            await self.console.stop()
        finally:
            # Even when closing failed above: a later kill() only re-raises that error.
            if self._owns_run_dir:
                await asyncio.to_thread(self.cgroup.remove)  # it retries until tasks are freed
                shutil.rmtree(self.run_dir, ignore_errors=True)
        return usage

    def _usage_now(self) -> VMUsage:
        return VMUsage(
            cpu_ms=self.cgroup.cpu_ns() // 1_000_000,
            mem_peak_bytes=self._memory.sample(),
            uptime_ms=int((time.monotonic() - self.started_at) * 1000),
        )

    def usage(self) -> VMUsage:
        return self._final_usage or self._usage_now()

    # --- bookkeeping ------------------------------------------------------------------

    def _write_state(self) -> None:
        state: dict[str, Any] = {
            "id": self.id,
            "pid": self.pid,
            "accel": self.accel.name,
            "channel": self.channel.name,
            "channel_required": self.channel.required,
            "vsock_cid": self.vsock_cid,
            "vsock_key": self.vsock_key,
            "vcpus": self.spec.vcpus,
            "memory_mib": self.spec.memory_mib,
            "rootfs": str(self.spec.rootfs) if self.spec.rootfs else None,
            "scratch_mib": self.spec.scratch_mib,
            "started_unix": self.started_unix,
            "labels": self.spec.labels,
        }
        (self.run_dir / "vm.json").write_text(json.dumps(state))

    def _stderr_tail(self, size: int = 2000) -> str:
        """The end of QEMU's output: read from there (a QEMU the guest took over may have
        written gigabytes, which the whole file read into memory would cost the daemon)."""
        try:
            with open(self.run_dir / "qemu.stderr", "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                return f.read(size).decode("utf-8", "replace")
        except OSError:
            return ""


async def _end_tasks(*tasks: asyncio.Task[Any]) -> None:
    """Cancel `tasks` and wait until they are done, retrieving whatever they raised."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _result(task: asyncio.Task[AgentConnection]) -> AgentConnection | None:
    if task.done() and not task.cancelled() and task.exception() is None:
        return task.result()
    return None


async def _reconnect_agent(
    open_agent: Callable[[float], Awaitable[AgentConnection]], timeout: float
) -> AgentConnection:
    """Say hello to a running guest, reconnecting if it does not answer: the guest may not
    yet have seen the previous host go away (seen ~1 time in 8 after a daemon restart), and a
    fresh connection makes QEMU signal the port closed and open again."""
    deadline = time.monotonic() + timeout
    attempt = max(1.0, timeout / 4)
    while True:
        left = deadline - time.monotonic()
        try:
            return await open_agent(min(attempt, max(0.1, left)))
        except (TimeoutError, ChannelClosedError) as exc:
            if time.monotonic() + 0.05 >= deadline:
                raise VMError(f"the guest agent did not answer hello: {exc!r}", "agent") from exc
            await asyncio.sleep(0.05)


_CPU_STATE = re.compile(r"\b[RE]FL=([0-9a-f]+)\b.*?\bHLT=([01])\b")
_IF_FLAG = 0x200


def _all_halted(registers: str) -> bool:
    """From `info registers -a`: every CPU's line of flags says HLT=1 with IF clear."""
    cpus = _CPU_STATE.findall(registers)
    return bool(cpus) and all(hlt == "1" and not int(fl, 16) & _IF_FLAG for fl, hlt in cpus)


@functools.cache  # once per process
def _warn_unjailed() -> None:
    log.warning(
        "not running as root: QEMU runs without its jail (own user, namespaces, chroot) and "
        "without a cgroup (no memory or CPU limit); run as root, or set jail=False to say so"
    )


# sun_path holds 108 bytes with its terminating NUL.
UNIX_PATH_MAX = 107


def _listen(path: Path) -> socket.socket:
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ConfigError(
            f"socket path {path} is longer than the {UNIX_PATH_MAX} bytes a unix socket "
            "allows: set ISORUN_STATE_DIR to a shorter directory"
        )
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        s.listen(4)
    except BaseException:
        s.close()
        raise
    return s


def _template_key(spec: VMSpec, choice: accel_mod.AccelChoice, bins: _Binaries) -> str:
    return warm.template_key(
        bins.qemu, bins.kernel, bins.initramfs, choice.name, spec.vcpus, spec.memory_mib
    )


def _vsock_failure(error: str) -> str | None:
    """The line of a boot's error saying the host (vsock.CidLease) or QEMU (its
    vhost-vsock device) could not set up the guest's vsock, if it has one."""
    for line in error.splitlines():
        low = line.lower()
        if "vhost-vsock" in low or "guest vsock" in low or "guest cid" in low:
            return line.strip()[:300]
    return None


def _warm_applies(spec: VMSpec, channel: vsock.ChannelChoice) -> bool:
    """A template restores over the serial channel only (a vsock device carries its CID in
    the saved state), into a VM that _warm_fits."""
    return channel.name == "serial" and _warm_fits(spec)


def _warm_fits(spec: VMSpec) -> bool:
    """A VM with a root filesystem whose disks fit a template's placeholders."""
    return spec.rootfs is not None and warm.fits(spec.rootfs, spec.scratch_mib * 1024 * 1024)
