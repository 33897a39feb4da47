"""signal_msi (KVM_SIGNAL_MSI): the rules both hypervisors share, and on KVM a guest that takes
the interrupt through its IDT."""

from __future__ import annotations

import errno
import struct

import pytest

from domain.vcpu_exit import IoOut
from tests.contract.conftest import Machine, refused
from tests.contract.longmode import CODE64_SEL

LAPIC_MSI = 0xFEE0_0000
VECTOR = 0x40


def test_needs_an_irqchip(machine):
    with refused(errno.EINVAL):
        machine.vm.signal_msi(LAPIC_MSI, VECTOR)


def test_values_must_fit_the_message(machine_irqchip):
    with refused(errno.EINVAL):
        machine_irqchip.vm.signal_msi(1 << 64, VECTOR)
    with refused(errno.EINVAL):
        machine_irqchip.vm.signal_msi(LAPIC_MSI, 1 << 32)


def test_a_destination_without_a_vcpu_is_not_delivered(machine_irqchip):
    assert machine_irqchip.vm.signal_msi(LAPIC_MSI | 7 << 12, VECTOR) is False


def test_a_message_to_an_existing_vcpu_is_accepted(machine_irqchip):
    assert isinstance(machine_irqchip.vm.signal_msi(LAPIC_MSI, VECTOR), bool)


IDT = 0x6000
HANDLER = 0x5000


def _gate(handler: int) -> bytes:
    """64-bit interrupt gate, present, ring 0."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, CODE64_SEL, 0, 0x8E, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)


@pytest.mark.kvm
def test_guest_takes_the_msi_through_its_idt():
    import os

    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is missing")
    from adapters.kvm.hypervisor import KvmHypervisor

    m = Machine(KvmHypervisor(), irqchip=True)
    try:
        m.memory.write(IDT + 16 * VECTOR, _gate(HANDLER))
        m.memory.write(HANDLER, bytes((0xB0, 0x42, 0xE6, 0x81, 0xF4)))  # mov al,0x42; out 0x81,al; hlt
        code = (bytes((0xBB,)) + (LAPIC_MSI + 0xF0).to_bytes(4, "little")  # mov ebx, LAPIC SVR
                + bytes((0xC7, 0x03)) + (0x1FF).to_bytes(4, "little")  # mov dword [rbx], 0x1ff: APIC on
                + bytes((0xE6, 0x80))  # out 0x80, al: ready
                + bytes((0xFB, 0xF4, 0xEB, 0xFD)))  # sti; 1: hlt; jmp 1b
        m.load(code)
        sregs = m.vcpu.get_sregs()
        sregs.idt.base, sregs.idt.limit = IDT, 16 * 256 - 1
        m.vcpu.set_sregs(sregs)
        exit_ = m.vcpu.run()
        assert type(exit_) is IoOut and exit_.port == 0x80
        assert m.vm.signal_msi(LAPIC_MSI, VECTOR) is True  # the LAPIC accepted it (IF still 0)
        exit_ = m.vcpu.run()
        assert type(exit_) is IoOut and exit_.port == 0x81 and bytes(exit_.data) == b"\x42"
    finally:
        m.close()
