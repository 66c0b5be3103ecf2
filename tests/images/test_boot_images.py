"""Images boot as VMs and run commands with their config honoured (issue 3's "done when").

Needs the guest kernel + initramfs from `make guest` (isorun.vmm.artifacts); fails, naming
what to build, when they are not built on this machine.
"""

from __future__ import annotations

from pathlib import Path

import ocibuild as ob
import pytest
from imghelpers import Registry

from isorun import vmm
from isorun.images import Image, ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


def _guest_ready() -> None:
    from isorun.vmm import artifacts

    # Fails, never skips: CI builds the guest (`make guest`) before the tests.
    artifacts.kernel_path()
    artifacts.initramfs_path()


async def _run(img: Image, cmd: str) -> tuple[int | None, str, str]:
    _guest_ready()
    vm = await vmm.MicroVM.boot(vmm.VMSpec(rootfs=img.rootfs, memory_mib=512))
    try:
        await vm.agent.set_defaults(
            env=img.config.env, cwd=img.config.working_dir, user=img.config.user
        )
        r = await vm.agent.exec(cmd=cmd)
        return r.exit_code, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    finally:
        await vm.shutdown()


@pytest.mark.parametrize(
    "name",
    [
        "base",
        pytest.param("python", marks=pytest.mark.slow),
        pytest.param("node", marks=pytest.mark.slow),
    ],
)
async def test_templates_boot(template_store: ImageStore, name: str) -> None:
    _guest_ready()
    img = await template_store.ensure(name)
    check = {
        "base": "cat /etc/os-release && git --version && curl --version | head -1 && "
        "echo host=$(cat /etc/hostname)/$(hostname) dns=$(wc -c < /etc/resolv.conf)",
        "python": "python -c 'import numpy, pandas, scipy, matplotlib; "
        "print(numpy.arange(4).sum())'",
        "node": "node -e 'console.log(6*7)' && npm --version",
    }[name]
    code, out, err = await _run(img, check)
    assert code == 0, err
    assert {"base": "bookworm", "python": "6", "node": "42"}[name] in out
    if name == "base":  # nothing of the host that built it: its name, its DNS server
        assert "host=isorun/isorun dns=0\n" in out


async def test_busybox_image_by_tag_and_digest_with_config(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    _guest_ready()
    lay = ob.Layout(tmp_path / "bb")
    lay.tag(
        lay.manifest(
            [
                ob.busybox_tree(
                    [
                        ob.dir_("work", uid=1000, gid=1000),
                        ob.file(
                            "etc/passwd",
                            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/work:/bin/sh\n",
                        ),
                    ]
                )
            ],
            config={
                "Env": ["PATH=/bin", "GREETING=hi there"],
                "WorkingDir": "/work",
                "User": "1000:1000",
            },
        ),
        "t",
    )
    digest = registry.push(f"oci:{lay.path}:t", "boot/bb:1")
    for ref in (f"{registry.host}/boot/bb:1", f"{registry.host}/boot/bb@{digest}"):
        img = await store.ensure(ref)
        code, out, err = await _run(img, 'echo "$GREETING"; pwd; id -u; cat /etc/os-release')
        assert code == 0, err
        assert out.splitlines()[:3] == ["hi there", "/work", "1000"]
        assert "isorun-busybox" in out
