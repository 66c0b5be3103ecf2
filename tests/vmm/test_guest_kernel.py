"""The guest kernel has what the guest foundation promises: its filesystems and virtio
drivers, and containers inside the guest (namespaces, cgroups, seccomp, netfilter, IPv6)."""

from __future__ import annotations

import pytest

from isorun.vmm import MicroVM

pytestmark = pytest.mark.vm


async def _sh(vm: MicroVM, script: str) -> str:
    r = await vm.agent.exec(script)
    assert r.exit_code == 0, f"{script!r}: exit {r.exit_code}, stderr {r.stderr!r}"
    return r.stdout.decode()


async def test_filesystems_and_virtio_drivers_are_built_in(vm: MicroVM) -> None:
    filesystems = {
        line.split()[-1] for line in (await _sh(vm, "cat /proc/filesystems")).splitlines()
    }
    assert {"ext4", "overlay", "tmpfs", "devpts", "proc", "sysfs", "cgroup2"} <= filesystems
    virtio = set((await _sh(vm, "ls /sys/bus/virtio/drivers")).split())
    assert {
        "virtio_blk",
        "virtio_net",
        "virtio_console",
        "virtio_rng",
        "virtio_balloon",
        "vmw_vsock_virtio_transport",
    } <= virtio
    # Both transports: virtio-mmio (microvm) and virtio-pci (a user's own machine type).
    assert "virtio-mmio" in (await _sh(vm, "ls /sys/bus/platform/drivers")).split()
    assert "virtio-pci" in (await _sh(vm, "ls /sys/bus/pci/drivers")).split()


async def test_the_crng_is_ready_when_the_agent_answers(vm: MicroVM) -> None:
    """With no virtio-rng device, the CPU's RDRAND seeds the CRNG at boot: /dev/random
    (which waits for it) answers at once, and the kernel said so."""
    assert "crng init done" in await _sh(vm, "dmesg")
    r = await vm.agent.exec("head -c 16 /dev/random | wc -c", timeout=5)
    assert (r.exit_code, r.stdout) == (0, b"16\n"), r


async def test_a_container_in_the_guest_gets_its_own_namespaces_and_cgroup(vm: MicroVM) -> None:
    out = await _sh(
        vm,
        "unshare --mount --uts --ipc --net --pid --fork --mount-proc "
        "sh -c 'hostname box; echo $$ $(hostname); ls /sys/class/net'",
    )
    assert out.split() == ["1", "box", "lo"]  # PID 1, its own hostname, an empty network
    # The unified cgroup hierarchy is mounted where container runtimes look for it, with
    # the controllers they limit a container by.
    controllers = (await _sh(vm, "cat /sys/fs/cgroup/cgroup.controllers")).split()
    assert {"cpu", "memory", "pids", "io"} <= set(controllers)
    out = await _sh(
        vm,
        "echo +pids +memory > /sys/fs/cgroup/cgroup.subtree_control && "
        "mkdir /sys/fs/cgroup/box && echo 3 > /sys/fs/cgroup/box/pids.max && "
        "echo 64M > /sys/fs/cgroup/box/memory.max && cat /sys/fs/cgroup/box/memory.max && "
        "sh -c 'echo $$ > /sys/fs/cgroup/box/cgroup.procs; "
        "for i in 1 2 3 4; do sleep 5 & done 2>&1; kill $(jobs -p) 2>/dev/null' 2>&1 || true",
    )
    assert out.splitlines()[0] == str(64 * 2**20)
    assert "can't fork" in out or "Resource temporarily unavailable" in out, out


async def test_seccomp_netfilter_and_ipv6_are_there(vm: MicroVM) -> None:
    actions = (await _sh(vm, "cat /proc/sys/kernel/seccomp/actions_avail")).split()
    assert {"kill_process", "errno", "allow"} <= set(actions)
    # iptables (with NAT: the MASQUERADE target) and conntrack are built in.
    assert "MASQUERADE" in (await _sh(vm, "cat /proc/net/ip_tables_targets")).split()
    assert (await _sh(vm, "cat /proc/sys/net/netfilter/nf_conntrack_max")).strip().isdigit()
    ping = await _sh(vm, "ping6 -c 1 -W 2 ::1")
    assert "1 packets received" in ping


async def test_what_the_agent_starts_keeps_the_usual_open_files_limit(vm: MicroVM) -> None:
    """Programs that close every fd up to their soft limit before an exec (close_fds loops)
    took 6.7 s per spawn under TCG when the agent handed its children 1<<20: they get the
    kernel's 1024 (the agent raises its own only once it runs out: openfiles_test.go)."""
    assert (await _sh(vm, "ulimit -n")).strip() == "1024"
