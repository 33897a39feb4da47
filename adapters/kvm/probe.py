"""Does a guest's VMCALL come back on this host? Measured once with a throw-away VM.

A Linux guest with more than one CPU uses KVM hypercalls when CPUID leaf 0x40000001 offers the
features behind them: PV IPIs (KVM_HC_SEND_IPI), PV spinlock kicks (KVM_HC_KICK_CPU) and
directed yield (KVM_HC_SCHED_YIELD). On kvm-pvm (nested, this project's CI host) a stock
kernel's VMCALL never completes: KVM re-enters the guest at the same instruction forever, so
the first IPI of an SMP boot hangs both CPUs (QEMU hangs the same way). The probe runs
``mov eax, KVM_HC_VAPIC_POLL_IRQ; vmcall; out; hlt`` in long mode and calls hypercalls usable
when the OUT exit arrives before a watchdog kick.
"""

from __future__ import annotations

import logging
import mmap
import threading

from domain import vcpu_exit as ve
from domain.boot.cpu import setup_boot_cpu
from domain.memory import GuestMemory

log = logging.getLogger("pystrato.kvm")

_RAM = 1 << 20  # room for the GDT and page tables at their boot addresses, and the code
CODE = 0x1000  # where the probe's code starts
PORT = 0x80  # the probe's OUT
_KVM_HC_VAPIC_POLL_IRQ = 1  # a hypercall that does nothing and returns 0 (kernel kvm_para.h)
_VMCALL = b"\x0f\x01\xc1"
# mov eax, 1; vmcall; out 0x80, al; hlt
_PROGRAM = b"\xb8" + _KVM_HC_VAPIC_POLL_IRQ.to_bytes(4, "little") + _VMCALL + bytes((0xE6, PORT, 0xF4))
# A working hypercall takes microseconds even nested; a broken one never returns.
TIMEOUT = 0.25


def hypercalls_complete(hv, timeout: float = TIMEOUT) -> bool:
    """True when a VMCALL from guest ring 0 returns to the next instruction within ``timeout``."""
    done, rip = reaches_out(hv, _PROGRAM, timeout)
    if not done:
        log.info("KVM hypercalls do not complete on this host (no exit %.2f s after the VMCALL, "
                 "rip %#x): the PV features behind them are hidden from SMP guests", timeout, rip)
    return done


def reaches_out(hv, code: bytes, timeout: float) -> tuple[bool, int]:
    """Run ``code`` in long mode on a throw-away VM: (did it reach ``out 0x80`` within
    ``timeout``, the vCPU's rip when it stopped)."""
    buf = mmap.mmap(-1, _RAM)
    mem = GuestMemory([(0, buf)])
    vm = hv.create_vm()
    try:
        vm.set_memory_region(0, 0, mem.regions[0].view)
        vcpu = vm.create_vcpu(0)
        mem.write(CODE, code)
        regs, sregs = setup_boot_cpu(mem, CODE)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        timer = threading.Timer(timeout, vcpu.kick)
        timer.daemon = True
        timer.start()
        try:
            # The kick signals this thread inside KVM_RUN, or sets immediate_exit if it lands
            # before: either way run() returns Interrupted.
            exit_ = vcpu.run()
        finally:
            timer.cancel()
            timer.join()
        return type(exit_) is ve.IoOut and exit_.port == PORT, vcpu.get_regs().rip
    finally:
        vm.close()
        mem.release()
        buf.close()
