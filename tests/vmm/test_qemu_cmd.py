"""The kernel command line differs between KVM and TCG only where TCG needs it."""

from isorun.vmm import qemu_cmd


def test_tcg_skips_the_apic_timer_calibration_and_smp_unpatching() -> None:
    tcg = qemu_cmd.kernel_cmdline(True, "", "tcg").split()
    assert "noapictimer" in tcg and "noreplace-smp" in tcg
    assert "isorun.root=/dev/vda" in tcg


def test_kvm_guests_keep_their_local_apic_timer() -> None:
    # KVM has the TSC-deadline timer, so the calibration costs nothing there; the PIT
    # broadcast tick that replaces it under TCG would only cost KVM guests exits.
    kvm = qemu_cmd.kernel_cmdline(False, "quiet", "kvm").split()
    assert "noapictimer" not in kvm and "noreplace-smp" not in kvm
    assert not any(p.startswith("isorun.root=") for p in kvm)
