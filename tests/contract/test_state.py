"""Registers and complete vCPU / VM state: round trips, and restored state is validated."""

from __future__ import annotations

import copy

import pytest

from domain.cpu_state import Regs, VcpuSetup
from domain.errors import SnapshotFormatError
from domain.vcpu_exit import Interrupted, IoOut
from tests.contract import asm
from tests.contract.conftest import Machine
from tests.contract.longmode import CR0_PG, CR4_PAE, EFER_LMA, PML4_ADDR, enter


def test_regs_round_trip(machine):
    regs = Regs(**{name: 0x1111 * (i + 1) for i, name in enumerate(Regs.__dataclass_fields__)})
    regs.rflags = 0x2 | 1 << 6  # reserved bit 1 + ZF
    machine.vcpu.set_regs(regs)
    assert machine.vcpu.get_regs() == regs


def test_sregs_round_trip_in_long_mode(machine):
    enter(machine.vcpu, machine.memory, "long")
    sregs = machine.vcpu.get_sregs()
    assert sregs.cr3 == PML4_ADDR and sregs.cr4 & CR4_PAE and sregs.cr0 & CR0_PG
    assert sregs.efer & EFER_LMA and sregs.cs.l == 1 and sregs.cs.selector == 0x08
    machine.vcpu.set_sregs(sregs)
    assert machine.vcpu.get_sregs() == sregs


def paused_state(machine):
    """Flush the pending exit the way a pause does, then save."""
    machine.vcpu.kick()
    assert type(machine.vcpu.run()) is Interrupted
    machine.vcpu.clear_kick()
    return machine.vm.save_state(), machine.vcpu.save_state()


@pytest.mark.parametrize("irqchip", [False, True])
def test_state_moves_a_running_program_to_another_vm(hypervisor, irqchip):
    src = Machine(hypervisor, irqchip=irqchip)
    dst = Machine(hypervisor, irqchip=irqchip)
    try:
        src.load(asm.mov_al(ord("A")) + asm.out_imm(0x80) + asm.mov_al(ord("B")) + asm.out_imm(0x80)
                 + asm.mov_r32(asm.ECX, 0xC0FFEE) + asm.mov_al(ord("C")) + asm.out_imm(0x80)
                 + asm.out_imm(0x81) + asm.HLT)
        exit_ = src.vcpu.run()
        assert type(exit_) is IoOut and bytes(exit_.data) == b"A"
        vm_state, vcpu_state = paused_state(src)
        saved = copy.deepcopy((vm_state, vcpu_state))
        dst.memory.write(0, src.memory.read(0, src.memory.size))
        dst.vm.restore_state(vm_state)
        dst.vcpu.restore_state(vcpu_state)
        assert (vm_state, vcpu_state) == saved  # restoring does not consume the state
        assert dst.vcpu.get_regs() == src.vcpu.get_regs()
        assert dst.vcpu.get_sregs() == src.vcpu.get_sregs()
        exit_ = dst.vcpu.run()
        assert type(exit_) is IoOut and bytes(exit_.data) == b"B"
        exit_ = dst.vcpu.run()
        assert type(exit_) is IoOut and bytes(exit_.data) == b"C"
        assert dst.vcpu.get_regs().rcx == 0xC0FFEE
        # The source, untouched, goes on the same way.
        exit_ = src.vcpu.run()
        assert type(exit_) is IoOut and bytes(exit_.data) == b"B"
    finally:
        src.close()
        dst.close()


def test_irqchip_state_needs_an_irqchip(hypervisor):
    src = Machine(hypervisor, irqchip=True)
    dst = Machine(hypervisor, irqchip=False)
    try:
        with pytest.raises(SnapshotFormatError):
            dst.vm.restore_state(src.vm.save_state())
    finally:
        src.close()
        dst.close()


def _corruptions(state: dict):
    yield {}
    yield {**state, "version": 999}
    yield {k: v for k, v in state.items() if k != "version"}
    yield {**state, "surprise": 1}
    for key in state:
        if key != "version":
            yield {k: v for k, v in state.items() if k != key}
            yield {**state, key: "garbage"}


def test_vcpu_state_is_validated(machine):
    good = machine.vcpu.save_state()
    for bad in _corruptions(good):
        with pytest.raises(SnapshotFormatError):
            machine.vcpu.restore_state(bad)
    machine.vcpu.restore_state(good)


def test_vm_state_is_validated(machine_irqchip):
    vm = machine_irqchip.vm
    good = vm.save_state()
    for bad in _corruptions(good):
        with pytest.raises(SnapshotFormatError):
            vm.restore_state(bad)
    vm.restore_state(good)


def test_halted_vcpu_state_survives(hypervisor):
    src = Machine(hypervisor, irqchip=True)
    dst = Machine(hypervisor, irqchip=True)
    try:
        src.load(asm.HLT + asm.mov_al(1) + asm.out_imm(0x80))
        thread, result = src.run_in_thread()
        from tests.contract.test_kick import JOIN, wait_until_running

        wait_until_running(src, thread)
        src.vcpu.kick()
        thread.join(JOIN)
        assert type(result[0]) is Interrupted
        src.vcpu.clear_kick()
        state = src.vcpu.save_state()
        dst.memory.write(0, src.memory.read(0, src.memory.size))
        dst.vm.restore_state(src.vm.save_state())
        dst.vcpu.restore_state(state)
        # Still halted: without an interrupt it stays in the hypervisor until kicked.
        thread, result = dst.run_in_thread()
        wait_until_running(dst, thread)
        dst.vcpu.kick()
        thread.join(JOIN)
        assert type(result[0]) is Interrupted
    finally:
        src.close()
        dst.close()


def test_state_is_plain_data_the_snapshot_codec_carries(machine_irqchip):
    from domain.state_codec import decode_state, encode_state

    m = machine_irqchip
    m.vcpu.setup(VcpuSetup(index=0, apic_id=0, nr_vcpus=1))
    for obj in (m.vm, m.vcpu):
        state = obj.save_state()
        obj.restore_state(decode_state(encode_state(state)))
        assert obj.save_state().keys() == state.keys()
