"""Sandbox lifecycle: create (capacity check, image, boot), get/list, timeouts and the reaper,
kill with host-measured usage, and re-adoption of running VMs after a daemon restart."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isorun.agent.frames import MAX_PAYLOAD, request_payload
from isorun.daemon import heldends
from isorun.daemon.config import DaemonConfig
from isorun.daemon.errors import ApiError, CapacityError, Conflict, Forbidden, Gone, NotFound
from isorun.daemon.imageerrors import (
    image_api_error,
    pull_policy_for,
    refuse_host_path_image,
)
from isorun.daemon.models import CreateSandbox, env_bytes
from isorun.daemon.progress import progress_record
from isorun.daemon.store import LOCAL_TENANT, SandboxRow, StateError, Store
from isorun.errors import (
    ChannelClosedError,
    ConfigError,
    IsorunError,
    RequestTooLargeError,
    VMError,
)
from isorun.images import ImageConfig, ImageError, ImageStore, ProgressEvent
from isorun.vmm import (
    MicroVM,
    VMSpec,
    cgroup,
    console_of,
    death_reason_of,
    kill_orphan,
    last_written,
    remove_run_dir,
    run_dir_labels,
    running_pid,
    started_unix_of,
    usage_of,
)

log = logging.getLogger("isorund.sandboxes")
# What GET /logs shows of a running sandbox's console, and what is kept of it when it ends.
CONSOLE_KEPT = 64 * 1024
# A running sandbox's VM that a restarted daemon cannot adopt while it runs is retried
# every READOPT_PAUSE_S for READOPT_RETRY_S before it is given up.
READOPT_PAUSE_S = 2.0
READOPT_RETRY_S = 60.0
# At start every running VM is adopted at once and given this long (QMP, then the agent's
# hello, reconnecting once if the guest missed the old host's end): one that does not answer
# in time is retried in the background, so no guest (a hostile one that never answers
# hello) holds up the daemon's start, however many there are.
READOPT_FIRST_S = 2.0
TAG = "isorun.sandbox="
SANDBOX_LABEL = "isorun.sandbox"  # the VMSpec label naming a VM's sandbox
# Shapes whose warm-start templates may be queued at once (more boot cold until one is done).
MAX_TEMPLATING = 4
# How long a failed agent connection waits for its VM's exit (whose reason says more).
AGENT_LOSS_GRACE_S = 2.0
# Receives progress records of a create: the image's phases, then {"phase": "booting"}.
OnProgress = Callable[[dict[str, Any]], None]


@dataclass
class _HeldEnd:
    """An end the state database refused: `row` shows it (ended, why, usage)."""

    row: SandboxRow
    console: str = ""
    # The killed VM's run dirs, kept until the end is stored: their cgroups are the only
    # other record of what it used.
    run_dirs: list[Path] = field(default_factory=list)


@dataclass
class Live:
    row: SandboxRow
    vm: MicroVM
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    watcher: asyncio.Task[None] | None = None
    ending: asyncio.Future[dict[str, Any]] | None = None
    # why it is ending, known before its end is stored: what its requests cut short say
    end_reason: str | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task that belongs to this sandbox (e.g. an exec whose client went away)."""
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t


class SandboxManager:
    def __init__(self, cfg: DaemonConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self._images: ImageStore | None = None
        self.live: dict[str, Live] = {}
        # Being created: the row (its vcpus and memory count against capacity) and an event
        # set once create() is over, either way (a DELETE meanwhile waits on it).
        self.creating: dict[str, tuple[SandboxRow, asyncio.Event]] = {}
        # Creates still getting their image (a pull or template build may take minutes):
        # a kill cancels them there rather than waiting, and is answered their usage.
        self._getting_image: dict[str, asyncio.Task[Any]] = {}
        self._killed_getting_image: dict[str, dict[str, Any]] = {}
        self._reaper: asyncio.Task[None] | None = None
        # Warm-start templates being made or queued, by (vcpus, memory_mib).
        self._templating: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._template_slot = asyncio.Lock()
        self._stopping = False
        # Sandboxes ended while the state disk was full: their VM is gone, their end (and
        # usage record) is written once the disk has room (_record_pending_ends).
        self._unrecorded: dict[str, _HeldEnd] = {}
        # Running sandboxes whose VM runs but could not be re-adopted at start (QMP busy, a
        # slow hello): retried in the background before they are given up as lost.
        self._readopting: dict[str, tuple[SandboxRow, asyncio.Task[None]]] = {}
        # Ends under way (_end): a stop waits for them before the store is closed.
        self._ends: set[asyncio.Future[dict[str, Any]]] = set()

    @property
    def images(self) -> ImageStore:
        if self._images is None:
            self._images = ImageStore(self.cfg.image_dir)
        return self._images

    # --- start / stop ----------------------------------------------------------------

    async def start(self) -> None:
        # before any create: on a KVM host the first choice boots a test guest (kvmprobe)
        spec = VMSpec(vcpus=self.cfg.default_vcpus, memory_mib=self.cfg.default_memory_mib)
        with contextlib.suppress(IsorunError, OSError):  # a boot names what is missing
            choice = await asyncio.to_thread(MicroVM.accel_for, spec)
            log.info("VMs boot under %s (%s)", choice.name, choice.reason)
        await self._readopt()
        self._reaper = asyncio.create_task(self._reap_forever(), name="reaper")
        if self.cfg.warm_start:
            # the default shape's now, so that the first sandbox already starts warm
            self._make_warm_template_soon(
                VMSpec(
                    vcpus=self.cfg.default_vcpus,
                    memory_mib=self.cfg.default_memory_mib,
                    jail=self.cfg.jail,
                    state_dir=self.cfg.state_dir,
                )
            )

    def _make_warm_template_soon(self, spec: VMSpec) -> None:
        """Make the warm-start template of spec's shape in the background; until it is made,
        sandboxes of that shape boot cold. One task per shape, at most a few queued."""
        shape = (spec.vcpus, spec.memory_mib)
        if self._stopping or shape in self._templating or len(self._templating) >= MAX_TEMPLATING:
            return
        tspec = dataclasses.replace(spec, rootfs=None, extra_cmdline="", labels={}, warm_start=True)
        task = asyncio.create_task(self._make_warm_template(tspec), name=f"template {shape}")
        self._templating[shape] = task
        task.add_done_callback(lambda _: self._templating.pop(shape, None))

    async def _make_warm_template(self, spec: VMSpec) -> None:
        try:
            # One template guest at a time: each is a VM that no sandbox's capacity counts.
            async with self._template_slot:
                await MicroVM.prepare_warm_start(spec)
        except (IsorunError, OSError) as exc:
            log.warning(
                "warm start: no template for %d vCPU, %d MiB: %s", spec.vcpus, spec.memory_mib, exc
            )
        except Exception:  # an optimisation only: never the daemon's end
            log.exception("warm start: making a template failed")

    async def stop(self) -> None:
        self._stopping = True
        # A VM still being re-adopted keeps running (the next daemon tries again), unless
        # this daemon's sandboxes end with it.
        retrying = list(self._readopting.values())
        for task in (self._reaper, *self._templating.values(), *(t for _, t in retrying)):
            if task is not None:
                task.cancel()
                # whatever it died of, the sandboxes below must still be seen to
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # An end the reaper or a watcher had begun goes on in its own task: let it finish
        # (its VM is being killed) rather than leave that VM detached or its end unstored.
        await self._wait_for_ends()
        if self.cfg.kill_on_exit:
            for row, _ in retrying:
                with contextlib.suppress(Exception):
                    await self._lose(row, None, "daemon-stopped")
        for live in list(self.live.values()):
            if live.ending is not None:
                continue  # begun meanwhile: waited for below
            if self.cfg.kill_on_exit:
                try:
                    await self._end(live, "daemon-stopped")
                except Exception as exc:  # held if the state refused it: kill the rest too
                    log.warning("ending sandbox %s at stop: %s", live.row.id, exc)
                continue
            # Leave the VM running; the next daemon re-adopts it. Let go of it first: the
            # sandbox's requests then end with its connection, and none tells the guest to
            # CANCEL (which kills a foreground command, meant to outlive its client).
            if live.watcher is not None:
                live.watcher.cancel()  # before the connection closes: that is no death
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await live.watcher
            with contextlib.suppress(Exception):
                await live.vm.detach()
            for t in list(live.tasks):
                t.cancel()
        await self._wait_for_ends()
        self.live.clear()
        await self._record_pending_ends()  # a restart would otherwise call them lost

    async def _wait_for_ends(self) -> None:
        while self._ends:
            await asyncio.wait(set(self._ends))

    async def _readopt(self) -> None:
        """Take over what the last daemon left: the ends it could not store, its running
        VMs, and the VMs of creates it did not finish. No sandbox's state error stops the
        start: an end the database refuses is held (_hold_end), as at any other time."""
        running: list[SandboxRow] = []
        creating: list[SandboxRow] = []
        run_dirs = self._run_dirs_by_sandbox()  # one look: the sweep below takes the rest
        held = heldends.read_all(self.cfg.state_dir)
        for row in self.store.list_sandboxes(states=("creating", "running")):
            if (end := held.pop(row.id, None)) is not None:
                # ended by the last daemon, its end never stored: stored now as it was
                self._hold_end(
                    row,
                    end.reason,
                    end.usage,
                    end.error,
                    ended=end.ended,
                    console=end.console,
                    run_dirs=run_dirs.pop(row.id, []),
                    persist=False,
                )
            elif row.state == "running" and row.run_dir:
                running.append(row)
            else:
                creating.append(row)
        for sandbox_id in held:  # stored after all (or the row is gone): nothing to do
            heldends.forget(self.cfg.state_dir, sandbox_id)
        try:
            await self._record_pending_ends()
        except Exception:  # the reaper tries again
            log.exception("storing the ends held by the last daemon failed")
        for row in creating:
            # Its VM may have booted before the daemon stopped: billed for what it used.
            uses = []
            dirs = run_dirs.pop(row.id, [])
            for d in dirs:
                log.warning("killing VM %s of sandbox %s, cut short at its start", d.name, row.id)
                uses.append(await asyncio.to_thread(_end_orphan, d))
            usage, ended = _creating_usage(row, uses)
            try:
                await self._store_end(
                    row,
                    "error",
                    usage,
                    error="the daemon stopped while this sandbox was starting",
                    ended=ended,
                    run_dirs=dirs,
                )
            except Exception:  # its row stays 'creating' and its dirs stay: the next start
                log.exception("ending sandbox %s, cut short at its start, failed", row.id)
        async with asyncio.TaskGroup() as tg:
            tries = [tg.create_task(self._adopt_at_start(row)) for row in running]
        adopted = {vm_id for t in tries if (vm_id := t.result()) is not None}
        # VMs this daemon started but never recorded (crash during create): kill them. A
        # run dir no sandbox label names is not ours (another VMM user of the state dir).
        for sandbox_id, dirs in run_dirs.items():
            if sandbox_id in self.live or sandbox_id in self._readopting:
                continue
            if sandbox_id in self._unrecorded:  # kept until its end is stored
                continue
            for d in dirs:
                if d.name in adopted:
                    continue
                log.warning("removing orphan VM %s of sandbox %s", d.name, sandbox_id)
                await asyncio.to_thread(kill_orphan, d)
                remove_run_dir(d)
        if any(h.run_dirs for h in self._unrecorded.values()):
            # their (empty) cgroups say what they used, should the next start need it
            return
        swept = await asyncio.to_thread(cgroup.sweep_empty)
        if swept:
            log.info("removed %d empty VM cgroups left by killed host processes", swept)

    def _run_dirs_by_sandbox(self) -> dict[str, list[Path]]:
        """The run dirs in the state dir, by the sandbox each was made for."""
        found: dict[str, list[Path]] = {}
        with contextlib.suppress(OSError):
            for d in self.cfg.vms_dir.iterdir():
                if d.is_dir() and (sandbox_id := _sandbox_of(d)) is not None:
                    found.setdefault(sandbox_id, []).append(d)
        return found

    async def _adopt_at_start(self, row: SandboxRow) -> str | None:
        """Adopt a running sandbox's VM within READOPT_FIRST_S: its VM id, or None when it
        is lost (its VM is gone) or left to _readopt_later (it runs but did not answer)."""
        run_dir = Path(row.run_dir or "")
        try:
            vm = await MicroVM.adopt(run_dir, timeout=READOPT_FIRST_S)
        except Exception as exc:
            if _powered_off(exc) or running_pid(run_dir) is None:
                try:
                    if _powered_off(exc):
                        await self._lose(row, None, "poweroff")
                    else:
                        await self._lose(row, exc)
                except Exception:  # not to cancel the other VMs' adoption (TaskGroup)
                    log.exception("ending sandbox %s, whose VM is gone, failed", row.id)
            else:  # it runs: a passing trouble (or a guest that never answers), retried
                log.warning("sandbox %s not re-adopted yet: %s; retrying", row.id, exc)
                task = asyncio.create_task(self._readopt_later(row))
                self._readopting[row.id] = (row, task)
            return None
        self._take_over(row, vm)
        return vm.id

    def _take_over(self, row: SandboxRow, vm: MicroVM) -> None:
        live = Live(row, vm)
        self.live[row.id] = live
        live.watcher = asyncio.create_task(self._watch(live))
        log.info("re-adopted sandbox %s (vm %s)", row.id, vm.id)

    async def _readopt_later(self, row: SandboxRow) -> None:
        """Retry the adoption of a running sandbox's VM for READOPT_RETRY_S; given up (the
        VM killed, the sandbox lost) only then, or once the VM has gone."""
        deadline = time.monotonic() + READOPT_RETRY_S
        try:
            while True:
                await asyncio.sleep(READOPT_PAUSE_S)
                if row.expires <= time.time():  # its timeout came meanwhile
                    await self._lose(row, None, "timeout")
                    return
                try:
                    vm = await MicroVM.adopt(Path(row.run_dir or ""))
                except Exception as exc:
                    if _powered_off(exc):
                        await self._lose(row, None, "poweroff")
                        return
                    if running_pid(Path(row.run_dir or "")) is None or (
                        time.monotonic() >= deadline
                    ):
                        try:
                            await self._lose(row, exc)
                        except Exception:  # its row stays running: the next start decides
                            log.exception("giving up sandbox %s failed", row.id)
                        return
                    continue
                self._take_over(row, vm)
                return
        finally:
            self._readopting.pop(row.id, None)

    async def _lose(self, row: SandboxRow, exc: BaseException | None, reason: str = "lost") -> None:
        """End a running sandbox that is not adopted (its VM could not be, `exc` says why):
        kill what is left of it."""
        run_dir = Path(row.run_dir or "")
        log.warning("sandbox %s ends unadopted (%s): %s", row.id, reason, exc)
        # One that died while no daemon watched stopped about when its run dir was last
        # written (its console, its memory peak): not billed for the downtime after that.
        stopped = None if running_pid(run_dir) is not None else last_written(run_dir)
        await asyncio.to_thread(kill_orphan, run_dir)
        # read before its cgroup goes: an OOM kill while no daemon watched, what it used
        died = death_reason_of(run_dir, row.memory_mib)
        why = "; ".join(str(x) for x in (exc, died) if x)
        cpu_ms, mem_peak = usage_of(run_dir)
        console = console_of(run_dir)
        # Billed up to then (up to now if it ran until now, or nothing says), less what lies
        # past its own timeout (which would have ended it anyway); one started before the
        # host last booted died by then (no VM outlives a reboot), and is billed and ended
        # as of then: its timeout may have fallen between the reboot and now.
        started = row.started or row.created
        ran_until = max(started, stopped) if stopped is not None else time.time()
        died_by = _not_past_a_reboot(started, ran_until)
        uptime_ms = max(0, int((died_by - started) * 1000))
        await self._store_end(
            row,
            reason,
            (cpu_ms, mem_peak, _billable_ms(row, uptime_ms, died_by)),
            error=f"VM could not be re-adopted after a daemon restart: {why}" if exc else None,
            ended=died_by,
            console=console,
            run_dirs=[run_dir],
        )

    async def _store_end(
        self,
        row: SandboxRow,
        reason: str,
        usage: tuple[int, int, int],
        *,
        error: str | None = None,
        ended: float | None = None,
        console: str = "",
        run_dirs: list[Path],
    ) -> None:
        """Store the end of a sandbox whose VMs are killed, then remove their run dirs and
        cgroups: not before, they are the only other record of what it used. An end the
        state database refuses is held (_hold_end), the run dirs kept until it is stored."""
        try:
            self.store.end_sandbox(
                row,
                reason,
                usage,
                self.cfg.price_per_vcpu_hour,
                error=error,
                ended=ended,
                console=console,
            )
        except StateError as exc:
            log.warning("sandbox %s ended (%s); its end is held: %s", row.id, reason, exc)
            self._hold_end(
                row, reason, usage, error, ended=ended, console=console, run_dirs=run_dirs
            )
            return
        for d in run_dirs:
            await asyncio.to_thread(remove_run_dir, d)
        await self._release_image(row)

    # --- lookups ---------------------------------------------------------------------

    def row(self, tenant: str, sandbox_id: str) -> SandboxRow:
        held = self._unrecorded.get(sandbox_id)
        row = held.row if held is not None else None
        if row is None and len(sandbox_id) <= 64:
            row = self.store.get_sandbox(sandbox_id)
        if row is None or row.tenant_id != tenant:
            raise NotFound(f"sandbox {sandbox_id!r} not found")
        return row

    def _refuse_if_readopting(self, sandbox_id: str) -> None:
        if sandbox_id in self._readopting:
            raise Conflict(
                f"sandbox {sandbox_id} is being re-adopted after a daemon restart; retry shortly"
            )

    def get_live(self, tenant: str, sandbox_id: str) -> Live:
        row = self.row(tenant, sandbox_id)
        live = self.live.get(sandbox_id)
        self._refuse_if_readopting(sandbox_id)
        if row.state == "creating":
            raise Conflict(f"sandbox {sandbox_id} is still starting; retry when it runs")
        if live is None or live.ending is not None:
            why = row.end_reason or (live.end_reason if live is not None else None) or "ended"
            raise _ended(sandbox_id, why)
        return live

    async def end_error(self, sandbox_id: str) -> Gone | None:
        """The 410 for a request cut short under a sandbox (its agent connection closed, its
        stdin pipe ended) if that was the sandbox's end: naming why (killed, timeout, the
        VM's exit), as every later request is told. A connection the guest's side closed
        first waits (bounded) for the watcher to record why. None: the sandbox runs on."""
        live = self.live.get(sandbox_id)
        if live is not None and live.ending is None:
            if not live.vm.agent.conn.is_closed:
                return None
            await self.settle(live)
        why = live.end_reason if live is not None else None
        if why is None:
            held = self._unrecorded.get(sandbox_id)
            row = held.row if held is not None else self.store.get_sandbox(sandbox_id)
            why = row.end_reason if row is not None else None
        return _ended(sandbox_id, why) if why else None

    async def explain(self, sandbox_id: str, exc: BaseException) -> BaseException:
        """`exc`, or for a lost agent connection the sandbox's end that it came from."""
        if isinstance(exc, ChannelClosedError):
            return await self.end_error(sandbox_id) or exc
        return exc

    async def settle(self, live: Live, timeout: float = AGENT_LOSS_GRACE_S + 3.0) -> None:
        """Wait (a bounded time) until a sandbox whose agent connection was lost has been
        ended and why recorded: its watcher does that once the VM's exit is known."""
        if live.watcher is not None:
            await asyncio.wait({live.watcher}, timeout=timeout)  # never cancels the watcher

    def list(self, tenant: str, metadata: dict[str, str], include_ended: bool) -> list[SandboxRow]:
        states = None if include_ended else ("creating", "running")
        held = self._unrecorded
        stored = self.store.list_sandboxes(tenant, states)
        rows = [held[r.id].row if r.id in held else r for r in stored]
        if not include_ended:
            rows = [r for r in rows if r.state != "ended"]
        return [r for r in rows if all(r.metadata.get(k) == v for k, v in metadata.items())]

    async def _record_pending_ends(self) -> None:
        """Store the ends the state database refused (a full disk, a lock held too long, an
        I/O error), oldest first, while it takes them."""
        for sandbox_id, held in list(self._unrecorded.items()):
            row = held.row
            usage = (row.cpu_ms or 0, row.mem_peak_bytes or 0, row.uptime_ms or 0)
            try:
                self.store.end_sandbox(
                    row,
                    row.end_reason or "ended",
                    usage,
                    self.cfg.price_per_vcpu_hour,
                    error=row.error,
                    ended=row.ended,
                    console=held.console,
                )
            except StateError:
                return
            del self._unrecorded[sandbox_id]
            # stored: what is left of it goes even if this caller is cancelled meanwhile
            await asyncio.shield(self._forget_held(held))

    async def _forget_held(self, held: _HeldEnd) -> None:
        """Once a held end is stored: its file, its VMs' run dirs and its image go."""
        heldends.forget(self.cfg.state_dir, held.row.id)
        for d in held.run_dirs:
            await asyncio.to_thread(_remove_vm, d)
        await self._release_image(held.row)

    def _hold_end(
        self,
        row: SandboxRow,
        reason: str,
        usage: tuple[int, int, int],
        error: str | None = None,
        *,
        ended: float | None = None,
        console: str = "",
        run_dirs: Sequence[Path] = (),
        persist: bool = True,
    ) -> None:
        """The state database refused to store this end: shown ended from now on, stored by
        the reaper once the database takes it (_record_pending_ends), or by the next daemon
        from its file in the state dir if this one stops first."""
        ended_at = time.time() if ended is None else ended
        row.state, row.end_reason, row.ended = "ended", reason, ended_at
        row.cpu_ms, row.mem_peak_bytes, row.uptime_ms = usage
        row.error = error or row.error
        self._unrecorded[row.id] = _HeldEnd(row, console, [*run_dirs])
        if persist:
            record = heldends.HeldRecord(reason, usage, row.error, ended_at, console)
            heldends.write(self.cfg.state_dir, row.id, record)

    # --- create ----------------------------------------------------------------------

    def allocated(self) -> tuple[int, int]:
        """vCPUs and MiB of guest memory held: running sandboxes and ones being created."""
        rows = [lv.row for lv in self.live.values()] + [r for r, _ in self.creating.values()]
        rows += [r for r, _ in self._readopting.values()]
        return sum(r.vcpus for r in rows), sum(r.memory_mib for r in rows)

    def _check_capacity(self, vcpus: int, memory_mib: int) -> None:
        used_cpu, used_mem = self.allocated()
        cpu_cap = int(self.cfg.host_cpus * self.cfg.cpu_overcommit)
        mem_cap = int(self.cfg.host_mem_mib * self.cfg.mem_overcommit)
        if used_cpu + vcpus > cpu_cap:
            raise CapacityError(
                f"host is full: {used_cpu} of {cpu_cap} vCPUs are allocated "
                f"({self.cfg.host_cpus} CPUs x overcommit {self.cfg.cpu_overcommit}); "
                f"asked for {vcpus}. Destroy sandboxes or ask for fewer vcpus"
            )
        if used_mem + memory_mib > mem_cap:
            raise CapacityError(
                f"host is full: {used_mem} of {mem_cap} MiB of guest memory are allocated "
                f"({self.cfg.host_mem_mib} MiB x overcommit {self.cfg.mem_overcommit}); "
                f"asked for {memory_mib} MiB. Destroy sandboxes or ask for less memory_mib"
            )

    def check_create(self, tenant: str, req: CreateSandbox) -> None:
        """What a create refuses before any work: a timeout over the maximum, a full host,
        an image reference that is malformed or not this caller's to name. Checked before
        a progress stream starts, these are plain HTTP errors, as without one."""
        timeout = req.sandbox_timeout or self.cfg.default_timeout_s
        if timeout > self.cfg.max_timeout_s:
            raise ApiError(
                f"sandbox_timeout={timeout} is over this daemon's maximum of "
                f"{self.cfg.max_timeout_s} seconds",
                code="invalid",
            )
        self._check_capacity(
            req.vcpus or self.cfg.default_vcpus, req.memory_mib or self.cfg.default_memory_mib
        )
        self._raw_rootfs(tenant, req.image)

    def _raw_rootfs(self, tenant: str, ref: str) -> Path | None:
        """The host file of a `rootfs:` image (None for any other reference), once the
        reference is known to be well formed and this caller's to name."""
        if ref.startswith("rootfs:"):
            if not (self.cfg.allow_raw_rootfs and tenant == LOCAL_TENANT):
                raise Forbidden(
                    "'rootfs:' images are for local callers of a daemon started "
                    "with ISORUN_ALLOW_RAW_ROOTFS=1; use a template or OCI image"
                )
            p = Path(ref[len("rootfs:") :])
            if not p.is_absolute() or not p.is_file():
                raise NotFound(f"image {ref!r} not found: no such ext4 file on the host")
            return p
        try:
            parsed = self.images.parse(ref)
        except ImageError as exc:
            raise image_api_error(ref, exc) from exc
        refuse_host_path_image(tenant, ref, parsed)
        return None

    async def _resolve_image(
        self, tenant: str, ref: str, holder: str, on_progress: OnProgress | None = None
    ) -> tuple[Path, str | None, ImageConfig]:
        if (raw := self._raw_rootfs(tenant, ref)) is not None:
            return raw, None, ImageConfig()
        progress = None
        if on_progress is not None:
            cb = on_progress

            def progress(ev: ProgressEvent) -> None:
                cb(progress_record(ev))

        try:
            img = await self.images.ensure(
                ref,
                progress=progress,
                holder=holder,
                policy=pull_policy_for(tenant, self.cfg.tenant_registries),
            )
        except ImageError as exc:
            raise image_api_error(ref, exc) from exc
        return img.rootfs, img.digest, img.config

    async def _release_image(self, row: SandboxRow) -> None:
        if row.image_digest:
            with contextlib.suppress(Exception):
                await self.images.release(row.image_digest, row.id)

    async def create(
        self, tenant: str, req: CreateSandbox, on_progress: OnProgress | None = None
    ) -> SandboxRow:
        cfg = self.cfg
        self.check_create(tenant, req)
        vcpus = req.vcpus or cfg.default_vcpus
        memory = req.memory_mib or cfg.default_memory_mib
        disk = req.disk_mib or cfg.default_disk_mib
        timeout = req.sandbox_timeout or cfg.default_timeout_s
        now = time.time()
        row = SandboxRow(
            id=f"sb-{uuid.uuid4().hex[:16]}",
            tenant_id=tenant,
            image=req.image,
            vcpus=vcpus,
            memory_mib=memory,
            disk_mib=disk,
            env=dict(req.env),
            metadata=dict(req.metadata),
            state="creating",
            created=now,
            timeout_s=timeout,
            expires=now + timeout + 3600,
        )
        created = asyncio.Event()
        self.creating[row.id] = (row, created)
        try:
            return await self._start(row, req, on_progress)
        finally:
            del self.creating[row.id]
            created.set()

    async def _start(
        self, row: SandboxRow, req: CreateSandbox, on_progress: OnProgress | None
    ) -> SandboxRow:
        vm: MicroVM | None = None
        try:
            self.store.insert_sandbox(row)
            task = asyncio.current_task()
            if task is not None:
                self._getting_image[row.id] = task
            try:
                rootfs, digest, icfg = await self._resolve_image(
                    row.tenant_id, req.image, row.id, on_progress
                )
            finally:
                self._getting_image.pop(row.id, None)
            # Stored now, not once booted: a daemon that dies during the boot leaves the
            # image held by this sandbox, and only a stored digest lets the next release it.
            row.image_digest = digest
            self.store.update_sandbox(row.id, image_digest=digest)
            _check_defaults_fit(icfg, req.env)
            if on_progress is not None:
                on_progress(
                    {"type": "progress", "phase": "booting", "ref": req.image, "sandbox": row.id}
                )
            spec = VMSpec(
                rootfs=rootfs,
                vcpus=row.vcpus,
                memory_mib=row.memory_mib,
                scratch_mib=row.disk_mib,
                jail=self.cfg.jail,
                state_dir=self.cfg.state_dir,
                extra_cmdline=f"{TAG}{row.id}",
                labels={SANDBOX_LABEL: row.id},
            )
            # A create never waits for a template boot: without one it boots cold, and the
            # template is made after it (not beside it: both would share the host's cores)
            # for the next sandbox of this shape.
            spec.warm_start = self.cfg.warm_start and MicroVM.warm_template_ready(spec)
            vm = await MicroVM.boot(spec)
            if self.cfg.warm_start and not spec.warm_start:
                self._make_warm_template_soon(spec)
            await vm.agent.set_defaults(**_defaults(icfg, req.env))
            started = time.time()
            row.state, row.started, row.expires = "running", started, started + row.timeout_s
            row.vm_id, row.run_dir, row.pid = vm.id, str(vm.run_dir), vm.pid
            self.store.update_sandbox(
                row.id,
                state="running",
                started=started,
                expires=row.expires,
                vm_id=vm.id,
                run_dir=row.run_dir,
                pid=vm.pid,
                image_digest=digest,
            )
        except BaseException as exc:
            usage = (0, 0, 0)
            if vm is not None:
                u = await vm.kill()
                usage = (u.cpu_ms, u.mem_peak_bytes, u.uptime_ms)
            msg = str(exc) or type(exc).__name__
            # A create refused (no such image, not the tenant's) made no sandbox: no row or
            # usage record stays for it. One that failed on its way keeps both, as an error.
            refused = vm is None and isinstance(exc, ApiError) and exc.status < 500
            killed = self._killed_getting_image.get(row.id)
            if not isinstance(exc, asyncio.CancelledError):
                killed = None
            try:
                if refused:
                    self.store.forget_sandbox(row.id)
                elif killed is not None:
                    price = self.cfg.price_per_vcpu_hour
                    killed.update(self.store.end_sandbox(row, "killed", usage, price))
                elif self.store.get_sandbox(row.id) is not None:
                    self.store.end_sandbox(
                        row, "error", usage, self.cfg.price_per_vcpu_hour, error=msg[:4000]
                    )
            except StateError:
                # left as 'creating' for good otherwise (the disk an image pull filled is the
                # state's too, by default): ended, and stored once the database takes it
                self._hold_end(row, "killed" if killed is not None else "error", usage, msg[:4000])
            except Exception:  # the create's own error is the one to report
                log.exception("recording the failed create of %s", row.id)
            await self._release_image(row)
            if killed is not None:
                # the cancel was kill()'s, answered here: this task goes on as uncancelled
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                raise Gone(
                    f"sandbox {row.id} was killed while its image {req.image!r} was being fetched"
                ) from None
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            if full or (isinstance(exc, VMError) and exc.reason == "host_disk_full"):
                raise ApiError(
                    f"the host's disk for sandbox VMs is full: {exc}",
                    status=507,
                    code="host_disk_full",
                ) from exc
            if isinstance(exc, VMError):
                raise ApiError(
                    f"sandbox VM failed to start: {exc}", status=500, code="boot_failed"
                ) from exc
            if isinstance(exc, ConfigError):
                # The request was checked before this: what is missing is the host's (no
                # guest kernel, no QEMU, no cgroup), so it is the operator's to fix.
                raise ApiError(
                    f"this host cannot run sandbox VMs: {exc}", status=500, code="host_setup"
                ) from exc
            raise
        live = Live(row, vm)
        self.live[row.id] = live
        live.watcher = asyncio.create_task(self._watch(live))
        return row

    # --- ending ----------------------------------------------------------------------

    async def kill(self, tenant: str, sandbox_id: str) -> dict[str, Any]:
        row = self.row(tenant, sandbox_id)
        self._refuse_if_readopting(sandbox_id)
        live = self.live.get(sandbox_id)
        starting = self.creating.get(sandbox_id)
        if live is None and starting is not None:
            getting_image = self._getting_image.get(sandbox_id)
            if getting_image is not None:
                # Still fetching its image (minutes, for a big pull or a template build):
                # stopped there. What it cost is nothing, but the answer has the same shape.
                killed = self._killed_getting_image.get(sandbox_id)
                if killed is None:  # once: a second cancel would break the create's cleanup
                    killed = {"cpu_ms": 0, "mem_peak_bytes": 0, "uptime_ms": 0}
                    self._killed_getting_image[sandbox_id] = killed
                    getting_image.cancel()
                await starting[1].wait()
                self._killed_getting_image.pop(sandbox_id, None)
                if "billed_seconds" in killed:
                    return killed
            # Starting: end it as soon as its boot is over (as E2B and Modal let you).
            await starting[1].wait()
            live = self.live.get(sandbox_id)
            row = self.row(tenant, sandbox_id)
        if live is None:
            raise Gone(f"sandbox {sandbox_id} has already ended ({row.end_reason})")
        return await self._end(live, "killed")

    async def abandon(self, sandbox_id: str) -> None:
        """End a sandbox whose creator went away before it was told the sandbox's id."""
        live = self.live.get(sandbox_id)
        if live is not None:
            log.info("sandbox %s: its client went away during create; destroying it", sandbox_id)
            await self._end(live, "abandoned")

    def set_timeout(self, tenant: str, sandbox_id: str, seconds: int) -> SandboxRow:
        live = self.get_live(tenant, sandbox_id)
        if seconds > self.cfg.max_timeout_s:
            raise ApiError(
                f"sandbox_timeout={seconds} is over this daemon's maximum of "
                f"{self.cfg.max_timeout_s} seconds",
                code="invalid",
            )
        expires = time.time() + seconds
        self.store.update_sandbox(sandbox_id, expires=expires, timeout_s=seconds)
        live.row.expires, live.row.timeout_s = expires, seconds
        return live.row

    async def _end(self, live: Live, reason: str) -> dict[str, Any]:
        if live.ending is None:
            live.end_reason = reason
            # Its own task: a caller cancelled meanwhile (the reaper or a VM-exit watcher at
            # a daemon's stop, a client gone) must not cut it between the VM's kill and the
            # record of its end, which the next daemon would then call lost.
            ending = asyncio.ensure_future(self._finish_end(live, reason, asyncio.current_task()))
            live.ending = ending
            self._ends.add(ending)
            ending.add_done_callback(_ended_task_done)
            ending.add_done_callback(self._ends.discard)
        return await asyncio.shield(live.ending)

    async def _finish_end(
        self, live: Live, reason: str, caller: asyncio.Task[Any] | None
    ) -> dict[str, Any]:
        try:
            for t in list(live.tasks):
                if t is not caller:
                    t.cancel()
            if live.watcher is not None and live.watcher is not caller:
                live.watcher.cancel()
            u = await live.vm.kill()
            uptime_ms = _billable_ms(live.row, u.uptime_ms, time.time())
            usage = {
                "cpu_ms": u.cpu_ms,
                "mem_peak_bytes": u.mem_peak_bytes,
                "uptime_ms": uptime_ms,
            }
            console = live.vm.console.tail(CONSOLE_KEPT)
            try:
                bill = self.store.end_sandbox(
                    live.row,
                    reason,
                    (u.cpu_ms, u.mem_peak_bytes, uptime_ms),
                    self.cfg.price_per_vcpu_hour,
                    console=console,
                )
            except StateError:
                # The VM is gone: shown ended from now on, stored when the database takes it
                # (a full disk, or one another process holds locked).
                usage_t = (u.cpu_ms, u.mem_peak_bytes, uptime_ms)
                self._hold_end(live.row, reason, usage_t, console=console)
                raise
            await self._release_image(live.row)
            return {**usage, **bill}
        finally:
            self.live.pop(live.row.id, None)

    async def _watch(self, live: Live) -> None:
        """End a sandbox whose VM exited, or whose agent connection failed while its VM
        runs on (a guest that broke the protocol: nothing could reach it any more, and it
        would be billed until its timeout)."""
        exited = asyncio.ensure_future(live.vm.wait())
        agent_gone = asyncio.ensure_future(live.vm.agent.conn.wait_closed())
        try:
            await asyncio.wait({exited, agent_gone}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done() and live.vm.agent.conn.failed:
                # a dying VM also ends the stream: its exit, if it comes, says more
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), AGENT_LOSS_GRACE_S)
            if exited.done():
                reason = f"vm-exited: {exited.result()}"
            elif live.vm.agent.conn.failed:
                reason = f"agent-failed: {live.vm.agent.conn.closed_error()}"[:500]
            else:  # the host closed it (detach for a restart): the VM is left running
                return
        finally:
            for task in (exited, agent_gone):
                task.cancel()
        if live.ending is None:
            log.info("sandbox %s ends: %s", live.row.id, reason)
            with contextlib.suppress(Exception):
                await self._end(live, reason)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reaper_interval_s)
            if self._unrecorded:
                try:
                    await self._record_pending_ends()
                except Exception:  # the reaper must go on: timeouts depend on it
                    log.exception("storing the ends of sandboxes failed")
            now = time.time()
            for live in list(self.live.values()):
                if live.ending is None and live.row.expires <= now:
                    log.info("sandbox %s reached its timeout", live.row.id)
                    try:
                        await self._end(live, "timeout")
                    except Exception:
                        log.exception("reaping %s failed", live.row.id)


def _defaults(icfg: ImageConfig, env: dict[str, str]) -> dict[str, Any]:
    """What a new sandbox's agent is told to run its commands with: the image's env, working
    dir and user, with the create's env over the image's."""
    return {"env": {**icfg.env, **env}, "cwd": icfg.working_dir, "user": icfg.user}


def _check_defaults_fit(icfg: ImageConfig, env: dict[str, str]) -> None:
    """Refuse, before any boot, a create whose env and the image's would not fit in the
    one request the agent is sent them in (each alone is bounded, not both together)."""
    try:
        request_payload({"op": "set_defaults", **_defaults(icfg, env)})
    except RequestTooLargeError:
        size = env_bytes({**icfg.env, **env})
        raise ApiError(
            f"invalid request: env: with the image's own env ({env_bytes(icfg.env)} bytes) "
            f"it comes to {size} bytes as JSON, over the {MAX_PAYLOAD} one request to the "
            "guest agent may carry; write big values to files in the sandbox instead",
            status=422,
            code="invalid",
        ) from None


def _ended_task_done(task: asyncio.Future[Any]) -> None:
    """Mark an end's failure seen: its callers may all have been cancelled, and it was
    logged where it mattered (or is held for the database, _hold_end)."""
    if not task.cancelled():
        task.exception()


def _ended(sandbox_id: str, why: str) -> Gone:
    return Gone(f"sandbox {sandbox_id} has ended ({why}); create a new sandbox")


def _powered_off(exc: BaseException) -> bool:
    """An adoption that found the guest powered off while no daemon watched: it ended then
    (as it would have with a daemon attached), not lost."""
    return isinstance(exc, VMError) and exc.reason == "halted"


def _host_boot_time() -> float | None:
    """When the host last booted (unix time, /proc/stat's btime), or None if unknown."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _not_past_a_reboot(started: float, until: float) -> float:
    """`until`, or the host's last boot if the VM started before it: no VM outlives one."""
    booted = _host_boot_time()
    if booted is not None and started < booted:
        return min(until, booted)
    return until


def _billable_ms(row: SandboxRow, uptime_ms: int, now: float) -> int:
    """`uptime_ms` of a sandbox ending at `now`, less any time it ran on past its expiry
    (the daemon down or re-adopting it, the reaper's tick late): a sandbox is not billed
    past its own timeout, whatever ends it."""
    overrun_ms = int((now - row.expires) * 1000) if row.expires else 0
    return max(0, uptime_ms - max(0, overrun_ms))


@dataclass(frozen=True, slots=True)
class _OrphanUse:
    """What the VM of a removed run dir used, and from when to when it ran (unix time)."""

    cpu_ms: int
    mem_peak: int
    start: float
    end: float


def _end_orphan(run_dir: Path) -> _OrphanUse:
    """Kill the VM of a run dir no sandbox row names: what it used, read from its cgroup,
    which is kept (with the dir) until its end is stored. It ran until now if it still did,
    else until it last wrote to its run dir (its console, its memory peak), and never past
    the host's boot."""
    ran_until = time.time() if running_pid(run_dir) is not None else last_written(run_dir)
    _, mem_peak = usage_of(run_dir)  # before the kill takes its memory
    kill_orphan(run_dir)
    cpu_ms, mem_after = usage_of(run_dir)
    start = started_unix_of(run_dir)
    ran_until = ran_until or time.time()
    start = min(start or ran_until, ran_until)
    ran_until = _not_past_a_reboot(start, ran_until)
    return _OrphanUse(cpu_ms, max(mem_peak, mem_after), start, max(start, ran_until))


def _remove_vm(run_dir: Path) -> None:
    """Kill whatever still runs of a kept VM's run dir (nothing should), and remove it."""
    kill_orphan(run_dir)
    remove_run_dir(run_dir)


def _creating_usage(
    row: SandboxRow, uses: list[_OrphanUse]
) -> tuple[tuple[int, int, int], float | None]:
    """The usage of a sandbox whose create was cut short, from its VMs' (a retried boot
    leaves two): their CPU added up, the highest peak, the time any of them ran (overlaps
    once), at most its timeout; and when the last one stopped (None: it had none)."""
    ran_s, reach = 0.0, float("-inf")
    for use in sorted(uses, key=lambda u: u.start):
        ran_s += max(0.0, use.end - max(use.start, reach))
        reach = max(reach, use.end)
    uptime_ms = min(int(ran_s * 1000), row.timeout_s * 1000)
    cpu_ms = sum(u.cpu_ms for u in uses)
    mem_peak = max((u.mem_peak for u in uses), default=0)
    return (cpu_ms, mem_peak, uptime_ms), (reach if uses else None)


def _sandbox_of(run_dir: Path) -> str | None:
    """The sandbox id a run dir was made for: its label (written as the dir is made), or
    for a VM of an older daemon the tag on its kernel command line."""
    labelled = run_dir_labels(run_dir).get(SANDBOX_LABEL)
    if labelled is not None:
        return labelled
    try:
        argv = json.loads((run_dir / "argv.json").read_text())
    except (OSError, ValueError):
        return None
    for a in argv if isinstance(argv, list) else []:
        if isinstance(a, str) and TAG in a:
            tail = a.split(TAG, 1)[1]
            return tail.split()[0] if tail else None
    return None
