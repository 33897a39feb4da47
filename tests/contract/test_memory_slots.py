"""Memory slots and dirty logging, with KVM's answers (errno) for what it refuses."""

from __future__ import annotations

import errno

from domain.vcpu_exit import Hlt, IoOut, MmioWrite
from tests.contract import asm
from tests.contract.asm import EAX, EBX
from tests.contract.conftest import RAM_SIZE, refused

SLOT1_GPA = 0x20_0000  # right after slot 0's 2 MiB
SLOT1_SIZE = 0x1_0000  # 16 pages


def extra_ram(machine, gpa=SLOT1_GPA, size=SLOT1_SIZE):
    mem = machine.allocator.allocate([(gpa, size)])
    machine.extra.append(mem)
    return mem.regions[0].view


def test_overlapping_slot_is_refused(machine):
    with refused(errno.EEXIST):
        machine.vm.set_memory_region(1, RAM_SIZE - 0x1000, extra_ram(machine, RAM_SIZE - 0x1000, 0x2000))


def test_busy_slot_is_refused(machine):
    with refused(errno.EEXIST):
        machine.vm.set_memory_region(0, 0x100_0000, extra_ram(machine, 0x100_0000, 0x1000))


def test_slot_can_be_removed_and_set_again(machine):
    view = extra_ram(machine)
    vm = machine.vm
    vm.set_memory_region(1, SLOT1_GPA, view)
    vm.remove_memory_region(1)
    vm.set_memory_region(1, SLOT1_GPA + SLOT1_SIZE, view)
    vm.remove_memory_region(1)
    with refused(errno.EINVAL):
        vm.remove_memory_region(1)


def test_misaligned_slot_is_refused(machine):
    view = extra_ram(machine)
    with refused(errno.EINVAL):
        machine.vm.set_memory_region(1, SLOT1_GPA + 0x10, view)


def dirtying_program(*offsets: int) -> bytes:
    code = b""
    for off in offsets:
        code += asm.mov_r32(EBX, SLOT1_GPA + off) + asm.store8(EBX, EAX)
    return code + asm.HLT


def test_dirty_log_reports_pages_the_guest_wrote(machine):
    machine.vm.set_memory_region(1, SLOT1_GPA, extra_ram(machine), log_dirty=True)
    machine.load(dirtying_program(0, 0x3000, 0xF000 + 8))
    assert type(machine.vcpu.run()) is Hlt
    assert machine.vm.get_dirty_log(1) == bytes([0b0000_1001, 0b1000_0000])
    assert machine.vm.get_dirty_log(1) == bytes(2)  # reading cleared it


def test_dirty_log_can_be_switched_on_for_a_live_slot(machine):
    view = extra_ram(machine)
    vm = machine.vm
    vm.set_memory_region(1, SLOT1_GPA, view)
    with refused(errno.ENOENT):
        vm.get_dirty_log(1)
    vm.set_memory_region(1, SLOT1_GPA, view, log_dirty=True)
    machine.load(dirtying_program(0x1000))
    assert type(machine.vcpu.run()) is Hlt
    assert vm.get_dirty_log(1) == bytes([0b10, 0])
    vm.set_memory_region(1, SLOT1_GPA, view)
    with refused(errno.ENOENT):
        vm.get_dirty_log(1)


def test_dirty_log_of_unknown_slot_is_refused(machine):
    with refused(errno.ENOENT):
        machine.vm.get_dirty_log(7)


def test_readonly_slot_reads_from_ram_and_writes_exit(machine):
    view = extra_ram(machine)
    view[0:2] = b"\x42\x43"
    machine.vm.set_memory_region(1, SLOT1_GPA, view, readonly=True)
    machine.load(asm.mov_r32(EBX, SLOT1_GPA) + asm.load8(EAX, EBX) + asm.out_imm(0x80)
                 + asm.mov_al(0x99) + asm.store8(EBX, EAX, 1) + asm.HLT)
    exit_ = machine.vcpu.run()
    assert type(exit_) is IoOut and bytes(exit_.data) == b"\x42"
    exit_ = machine.vcpu.run()
    assert type(exit_) is MmioWrite and exit_.addr == SLOT1_GPA + 1 and bytes(exit_.data) == b"\x99"
    assert type(machine.vcpu.run()) is Hlt
    assert bytes(view[1:2]) == b"\x43"
