"""The agent channel over vsock: choosing it, reserving a CID, and the agent refusing
anyone but the host. The host↔guest leg needs /dev/vhost-vsock, which these TCG hosts
lack; that test runs wherever the device is usable."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from vmhelpers import assert_vm_gone, vm_spec

from isorun.errors import ConfigError
from isorun.vmm import MicroVM, vsock

GUEST_AGENT = Path(__file__).resolve().parents[2] / "guest" / "agent"


def test_channel_choice_names_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ISORUN_CHANNEL", raising=False)
    missing = tmp_path / "vhost-vsock"
    assert vsock.choose("serial", missing).name == "serial"
    # auto never picks vsock, usable or not: any local user could reach the agent there
    for device in (missing, Path("/dev/null")):
        auto = vsock.choose(None, device)
        assert auto.name == "serial" and "ISORUN_CHANNEL=vsock" in auto.reason, auto
    with pytest.raises(ConfigError, match=r"vsock requested but .*vhost-vsock.*modprobe"):
        vsock.choose("vsock", missing)
    with pytest.raises(ConfigError, match=r"'pigeon' is not one of auto, serial, vsock"):
        vsock.choose("pigeon", missing)
    monkeypatch.setenv("ISORUN_CHANNEL", "serial")
    assert vsock.choose(None, missing).reason == "requested"


def test_reserving_a_cid_on_something_else_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"/dev/null refused guest CID \d+.*vhost-vsock"):
        vsock.CidLease.reserve(Path("/dev/null"))


@pytest.fixture(scope="session")
def vsockprobe(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    out = tmp_path_factory.mktemp("probe") / "vsockprobe"
    subprocess.run(
        [go, "build", "-trimpath", "-o", str(out), "./cmd/vsockprobe"],
        cwd=GUEST_AGENT,
        env={**os.environ, "CGO_ENABLED": "0"},
        check=True,
    )
    return out.read_bytes()


@pytest.mark.vm
async def test_a_guest_process_cannot_reach_the_agent_over_vsock(
    busybox_rootfs: Path, vsockprobe: bytes
) -> None:
    # The agent listens on vsock as it does with a vsock channel; the host talks serial.
    spec = vm_spec(
        busybox_rootfs, channel="serial", extra_cmdline=f"isorun.vsock={vsock.AGENT_PORT}"
    )
    vm = await MicroVM.boot(spec)
    try:
        await vm.agent.write_file("/tmp/vsockprobe", vsockprobe, mode=0o755)
        r = await vm.agent.exec(
            argv=["/tmp/vsockprobe", "-agent-port", str(vsock.AGENT_PORT)], user="user"
        )
        # control=ok: vsock loopback works in this guest, so the refusal means something;
        # agent=closed: the agent accepted the connection and closed it unanswered.
        assert (r.exit_code, r.stdout) == (0, b"control=ok agent=closed\n"), r.stderr
        # the agent's console line travels apart from the exec's answer (and the host's
        # console reader pauses between small reads): wait for it a moment
        deadline = asyncio.get_running_loop().time() + 10
        while "only the host may connect" not in vm.console.tail(4000):
            assert asyncio.get_running_loop().time() < deadline, vm.console.tail(4000)
            await asyncio.sleep(0.05)
        assert (await vm.agent.exec("echo still served")).stdout == b"still served\n"
    finally:
        await vm.kill()
        assert_vm_gone(vm)


@pytest.mark.vm
async def test_the_agent_channel_over_vhost_vsock(busybox_rootfs: Path) -> None:
    try:
        vsock.choose("vsock")
    except ConfigError as exc:
        pytest.skip(f"this host cannot give a guest vsock: {exc}")
    vm = await MicroVM.boot(vm_spec(busybox_rootfs, channel="vsock"))
    try:
        assert vm.channel.name == "vsock" and vm.vsock_cid is not None
        r = await vm.agent.exec("head -c 300000 /dev/zero | wc -c")
        assert r.stdout.strip() == b"300000"
        adopted = await MicroVM.adopt(vm.run_dir)
        assert adopted.vsock_cid == vm.vsock_cid
        assert (await adopted.agent.exec("echo again")).stdout == b"again\n"
        await adopted.detach()
    finally:
        await vm.kill()
        assert_vm_gone(vm)
