"""Linux with two CPUs on KVM: the kernel built by scripts/build-guest boots on pystrato's microvm
with -smp 2, brings up its second CPU (INIT/SIPI through the in-kernel LAPIC, the MP table, per-vCPU
CPUID topology), and its /init sees both online before it resets through the i8042.

This hung right after "Booting SMP configuration" on kvm-pvm: the guest's first PV IPI is a
VMCALL that never returns there (QEMU hangs the same way), so the KVM adapter now probes
hypercalls and hides the PV features behind them from SMP guests (adapters/kvm/probe.py).
Slow: a boot takes about a minute under kvm-pvm; nothing asserts a duration.
"""

from __future__ import annotations

import pytest

BOOT_TIMEOUT = 600.0

pytestmark = [pytest.mark.kvm, pytest.mark.slow, pytest.mark.timeout(int(BOOT_TIMEOUT) + 120)]


def test_linux_brings_up_two_cpus_and_its_init_sees_them_online(vm, linux_guest):
    append = (linux_guest / "cmdline").read_text().strip() + " pystrato.script=none pystrato.end=reboot"
    v = vm(linux_guest / "vmlinux", append, "-smp", "2", "-initrd", str(linux_guest / "initramfs.cpio"),
           mem_mib=256)
    v.wait_line(r"smp: Brought up 1 node, 2 CPUs", BOOT_TIMEOUT)
    online, _ = v.wait_line(r"PYSTRATO-CPUS-ONLINE (\S+)", BOOT_TIMEOUT)
    assert online.group(1) == "0-1", v.output[-3000:]
    cpus, _ = v.command("query-cpus")
    assert [c["CPU"] for c in cpus] == [0, 1]
    v.wait_line(r"PYSTRATO-SCRIPT-DONE", 120)
    assert v.wait_exit(120) == 0, v.stderr[-2000:]
    assert "Kernel panic" not in v.output
