"""A TCG guest keeps time on the TSC at the host's rate (vmm/tsc.py): its clocks and timers
are as fine as a real machine's, not 4 ms jiffies, and its clock keeps the host's pace."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest

from isorun.vmm import MicroVM, tsc, warm

pytestmark = pytest.mark.vm


async def _guest_now_ns(vm: MicroVM) -> tuple[int, float, float]:
    """The guest's CLOCK_MONOTONIC and the host's monotonic time just before and after."""
    before = time.monotonic()
    r = await vm.agent.exec("grep -m1 'now at' /proc/timer_list")
    after = time.monotonic()
    found = re.search(rb"now at (\d+) nsecs", r.stdout)
    assert r.exit_code == 0 and found, r
    return int(found.group(1)), before, after


async def test_a_tcg_guest_keeps_time_on_the_tsc_at_the_hosts_pace(vm: MicroVM) -> None:
    if vm.accel.name == "kvm":
        pytest.skip("a KVM guest keeps time with kvm-clock")
    if tsc.host_tsc_khz() is None:
        pytest.skip("this host's TSC is not invariant: the guest keeps jiffies")
    # tsc-early until the kernel's refinement work registers `tsc`, a second after its boot
    current = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
    for _ in range(50):
        r = await vm.agent.exec(f"cat {current}")
        assert r.stdout.strip() in (b"tsc", b"tsc-early"), r
        if r.stdout.strip() == b"tsc":
            break
        await asyncio.sleep(0.2)
    assert r.stdout.strip() == b"tsc", r
    # high-resolution timers: a sleep or a timeout in the guest is not rounded to 4 ms
    r = await vm.agent.exec("grep -m1 resolution /proc/timer_list")
    assert r.stdout.split()[-2:] == [b"1", b"nsecs"], r
    # the rate the guest was told is right: its clock and the host's advance together
    ns0, before0, after0 = await _guest_now_ns(vm)
    await asyncio.sleep(3)
    ns1, before1, after1 = await _guest_now_ns(vm)
    guest_s = (ns1 - ns0) / 1e9
    shortest, longest = before1 - after0, after1 - before0
    assert shortest * 0.99 <= guest_s <= longest * 1.01, (shortest, guest_s, longest)


def test_the_rate_is_measured_once_per_host_boot_and_keys_warm_templates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A restored guest keeps the rate its template booted with: one made at another rate
    # (a cache that outlived a move to other hardware) ran its clock 20% slow.
    monkeypatch.setenv("ISORUN_CACHE", str(tmp_path))
    tsc.host_tsc_khz.cache_clear()
    try:
        measured = tsc.host_tsc_khz()
        if measured is None:
            pytest.skip("this host's TSC is not invariant")
        kept = json.loads((tmp_path / "tsc-khz.json").read_text())
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert kept == {"boot_id": boot_id, "khz": measured}
        args = ("qemu-system-x86_64", Path("/dev/null"), Path("/dev/null"), "tcg", 1, 256)
        key = warm.template_key(*args)
        # the same host boot, another process: the kept figure, the same key
        tsc.host_tsc_khz.cache_clear()
        assert tsc.host_tsc_khz() == measured and warm.template_key(*args) == key
        # other hardware at the same cache: another rate, another template
        (tmp_path / "tsc-khz.json").write_text(json.dumps({"boot_id": boot_id, "khz": 3100002}))
        tsc.host_tsc_khz.cache_clear()
        assert warm.template_key(*args) != key
    finally:
        tsc.host_tsc_khz.cache_clear()
