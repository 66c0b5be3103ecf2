"""The agent channel over vsock: choosing it, reserving a CID, and the agent refusing
anyone but the host. The host↔guest leg needs /dev/vhost-vsock, which these TCG hosts
lack; that test runs wherever the device is usable."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
from fakeguest import read_frame
from vmhelpers import assert_vm_gone, vm_spec

from isorun.agent import AgentClient, AgentConnection, frames
from isorun.agent.frames import Kind
from isorun.errors import ChannelClosedError, ConfigError, VMError
from isorun.vmm import MicroVM, vsock

GUEST_AGENT = Path(__file__).resolve().parents[2] / "guest" / "agent"


def test_channel_choice_names_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ISORUN_CHANNEL", raising=False)
    missing = tmp_path / "vhost-vsock"
    usable = Path("/dev/null")  # opens: what choose asks of the device
    assert vsock.choose("serial", usable) == vsock.ChannelChoice("serial", "requested", True)
    # auto: vsock wherever the host can give a guest one, and serial may serve instead
    auto = vsock.choose(None, usable)
    assert (auto.name, auto.required) == ("vsock", False), auto
    auto = vsock.choose(None, missing)
    assert auto.name == "serial" and str(missing) in auto.reason, auto
    # a boot that may restore a template: serial, the only channel a template restores over
    auto = vsock.choose(None, usable, warm_start=True)
    assert auto.name == "serial" and "warm start" in auto.reason, auto
    asked = vsock.choose("vsock", usable, warm_start=True)
    assert (asked.name, asked.required) == ("vsock", True), asked
    with pytest.raises(ConfigError, match=r"vsock requested but .*vhost-vsock.*modprobe"):
        vsock.choose("vsock", missing)
    with pytest.raises(ConfigError, match=r"'pigeon' is not one of auto, serial, vsock"):
        vsock.choose("pigeon", missing)
    monkeypatch.setenv("ISORUN_CHANNEL", "serial")
    assert vsock.choose(None, usable).reason == "requested"


async def _fake_agent(
    seen: list[dict[str, object]],
    extra: Mapping[str, str],
    answer: bool = True,
    features: tuple[str, ...] = ("vsock_key",),
) -> tuple[AgentConnection, asyncio.Task[None]]:
    """A connection to a fake agent, hello said with `extra`. The fake records every
    request it gets in `seen` and answers each (or closes without answering the hello, as
    the agent does to a vsock peer without the key) until the host closes."""
    host_sock, guest_sock = socket.socketpair()
    gr, gw = await asyncio.open_connection(sock=guest_sock)

    async def guest() -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await serve()
        gw.close()

    async def serve() -> None:
        hello = await read_frame(gr)
        seen.append(hello.json())
        if answer:
            nonce = hello.json()["nonce"]
            gw.write(
                frames.encode_json(
                    0, Kind.RESP, {"ok": True, "nonce": nonce, "features": list(features)}
                )
            )
            while True:
                f = await read_frame(gr)
                if f.kind is Kind.REQ:
                    seen.append(f.json())
                    granted = {"interval_ms": 5000} if f.json()["op"] == "keepalive" else {}
                    gw.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, **granted}))

    task = asyncio.create_task(guest())
    return await AgentConnection.open(
        asyncio.open_connection(sock=host_sock), "a fake agent", 5, extra
    ), task


def _ops(seen: list[dict[str, object]]) -> list[object]:
    return [r["op"] for r in seen if r["op"] != "keepalive"]


async def test_the_vsock_key_goes_over_serial_and_comes_back_over_vsock() -> None:
    key = vsock.new_key()
    assert len(key) == 64 and key != vsock.new_key()
    serial_seen: list[dict[str, object]] = []
    vsock_seen: list[dict[str, object]] = []
    tasks: list[asyncio.Task[None]] = []

    async def over_serial(within: float) -> AgentConnection:
        conn, task = await _fake_agent(serial_seen, {})
        tasks.append(task)
        return conn

    async def over_vsock(extra: Mapping[str, str], within: float) -> AgentConnection:
        assert _ops(serial_seen) == ["hello", "set_vsock_key"], "vsock before the key was set"
        conn, task = await _fake_agent(vsock_seen, extra)
        tasks.append(task)
        return conn

    conn, fell_back = await vsock.open_keyed(over_serial, over_vsock, key, 5, fall_back=True)
    assert fell_back is None
    assert "key" not in serial_seen[0]
    assert [r.get("key") for r in serial_seen if r["op"] == "set_vsock_key"] == [key]
    assert vsock_seen[0]["op"] == "hello" and vsock_seen[0]["key"] == key
    await asyncio.wait_for(tasks[0], 5)  # the serial connection was closed: the fake ended
    await conn.close()
    await asyncio.wait_for(tasks[1], 5)


async def test_a_vsock_that_fails_falls_back_to_serial_unless_vsock_was_asked_for() -> None:
    key = vsock.new_key()
    tasks: list[asyncio.Task[None]] = []
    features: tuple[str, ...] = ("vsock_key",)

    async def over_serial(within: float) -> AgentConnection:
        conn, task = await _fake_agent([], {}, features=features)
        tasks.append(task)
        return conn

    async def refused(extra: Mapping[str, str], within: float) -> AgentConnection:
        conn, _ = await _fake_agent([], extra, answer=False)
        return conn  # never: the fake closes unanswered

    async def silent(extra: Mapping[str, str], within: float) -> AgentConnection:
        await asyncio.sleep(within + 10)
        raise AssertionError("not timed out")

    conn, fell_back = await vsock.open_keyed(over_serial, refused, key, 5, fall_back=True)
    assert fell_back is not None and "closed during hello" in fell_back, fell_back
    # the serial connection is the one in use, and it serves
    assert not conn.is_closed
    assert (await AgentClient(conn).call("health"))["ok"] is True
    await conn.close()
    # a vsock that never answers is given up on soon, not at the end of the boot timeout
    t0 = asyncio.get_running_loop().time()
    conn, fell_back = await vsock.open_keyed(over_serial, silent, key, 30, fall_back=True)
    assert asyncio.get_running_loop().time() - t0 < vsock.FALL_BACK_AFTER_S + 2
    assert fell_back is not None and "TimeoutError" in fell_back, fell_back
    await conn.close()
    with pytest.raises(ChannelClosedError, match="closed during hello"):
        await vsock.open_keyed(over_serial, refused, key, 1, fall_back=False)
    await asyncio.wait_for(tasks[-1], 5)  # its serial connection was closed too
    # an agent from before vsock keys is not given one, nor reached over vsock
    features = ()
    conn, fell_back = await vsock.open_keyed(over_serial, refused, key, 5, fall_back=True)
    assert fell_back is not None and "takes no vsock key" in fell_back, fell_back
    await conn.close()
    with pytest.raises(ConfigError, match=r"takes no vsock key.*make guest"):
        await vsock.open_keyed(over_serial, refused, key, 5, fall_back=False)


async def test_a_vsock_connection_closed_before_its_hello_is_tried_again() -> None:
    # Other local users' connects can push the host's out of the agent's few places for
    # connections that have not shown the key yet: the host connects again.
    key = vsock.new_key()
    tries: list[int] = []

    async def over_serial(within: float) -> AgentConnection:
        conn, _ = await _fake_agent([], {})
        return conn

    async def pushed_out_twice(extra: Mapping[str, str], within: float) -> AgentConnection:
        tries.append(1)
        conn, _ = await _fake_agent([], extra, answer=len(tries) > 2)
        return conn

    conn, fell_back = await vsock.open_keyed(over_serial, pushed_out_twice, key, 5, fall_back=False)
    assert fell_back is None and len(tries) == 3
    assert (await AgentClient(conn).call("health"))["ok"] is True
    await conn.close()


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


@pytest.mark.vm
async def test_a_vsock_the_guest_cannot_get_boots_over_serial_when_auto_chose_it(
    busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # auto chose vsock (a host whose /dev/vhost-vsock opens), but the guest's vsock does not
    # start. Here QEMU is handed an fd that is no vhost-vsock device and fails on it as it
    # would on a broken one; then the host cannot reserve a CID at all.
    def chosen(required: bool) -> None:
        choice = vsock.ChannelChoice("vsock", "test", required)
        monkeypatch.setattr(vsock, "choose", lambda *a, **k: choice)

    def not_vhost(device: Path = vsock.VHOST_VSOCK) -> vsock.CidLease:
        return vsock.CidLease(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), 77)

    def no_cid(device: Path = vsock.VHOST_VSOCK) -> vsock.CidLease:
        raise ConfigError(f"{device} refused guest CID 77: Device or resource busy")

    chosen(required=False)
    for reserve, said in ((not_vhost, "vhost-vsock-device"), (no_cid, "refused guest CID 77")):
        monkeypatch.setattr(vsock.CidLease, "reserve", staticmethod(reserve))
        vm = await MicroVM.boot(vm_spec(busybox_rootfs))
        try:
            assert vm.channel.name == "serial" and said in vm.channel.reason, vm.channel
            assert (await vm.agent.exec("echo up")).stdout == b"up\n"
        finally:
            await vm.kill()
            assert_vm_gone(vm)
    # asked for by name: the failure is the boot's
    chosen(required=True)
    monkeypatch.setattr(vsock.CidLease, "reserve", staticmethod(not_vhost))
    with pytest.raises(VMError, match="vhost-vsock-device"):
        await MicroVM.boot(vm_spec(busybox_rootfs))
