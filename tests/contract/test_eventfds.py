"""irqfd and ioeventfd: registration rules (KVM's errnos) and guest writes signalling eventfds."""

from __future__ import annotations

import errno
import os
import select

import pytest

from domain.vcpu_exit import Hlt, IoOut
from tests.contract import asm
from tests.contract.asm import EAX, EBX
from tests.contract.conftest import refused
from tests.contract.test_exits import MMIO_ADDR


@pytest.fixture
def efd():
    fds = []

    def make():
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


def count(fd: int) -> int:
    if not select.select([fd], [], [], 0)[0]:
        return 0
    return os.eventfd_read(fd)


# --- irqfd ---------------------------------------------------------------------------------------


def test_irqfd_needs_an_irqchip(machine, efd):
    with refused(errno.EINVAL):
        machine.vm.register_irqfd(efd(), 5)


def test_irqfd_register_duplicate_unregister(machine_irqchip, efd):
    vm, fd = machine_irqchip.vm, efd()
    vm.register_irqfd(fd, 5)
    with refused(errno.EBUSY):
        vm.register_irqfd(fd, 6)
    vm.unregister_irqfd(fd, 5)
    vm.unregister_irqfd(fd, 5)  # KVM ignores an unknown pair
    vm.register_irqfd(fd, 6)
    vm.register_irqfd(efd(), 6)  # several eventfds may share a GSI


def test_irqfd_must_be_an_eventfd(machine_irqchip):
    r, w = os.pipe()
    try:
        with refused(errno.EINVAL):
            machine_irqchip.vm.register_irqfd(r, 5)
    finally:
        os.close(r)
        os.close(w)


# --- ioeventfd -----------------------------------------------------------------------------------


def test_guest_port_write_signals_the_ioeventfd_without_exit(machine, efd):
    fd = efd()
    machine.vm.register_ioevent(fd, 0x510, 1, None, True)
    machine.load(asm.mov_al(3) + asm.mov_dx(0x510) + asm.OUT_DX_AL + asm.out_imm(0x80) + asm.HLT)
    exit_ = machine.vcpu.run()
    assert type(exit_) is IoOut and exit_.port == 0x80
    assert count(fd) == 1


def test_datamatch_only_signals_on_the_value(machine, efd):
    fd = efd()
    machine.vm.register_ioevent(fd, 0x520, 1, 9, True)
    machine.load(asm.mov_dx(0x520) + asm.mov_al(7) + asm.OUT_DX_AL + asm.mov_al(9) + asm.OUT_DX_AL
                 + asm.out_imm(0x80) + asm.HLT)
    exit_ = machine.vcpu.run()
    assert type(exit_) is IoOut and exit_.port == 0x520 and bytes(exit_.data) == b"\x07"
    exit_ = machine.vcpu.run()
    assert type(exit_) is IoOut and exit_.port == 0x80
    assert count(fd) == 1


def test_mmio_ioeventfd(machine, efd):
    fd = efd()
    machine.vm.register_ioevent(fd, MMIO_ADDR + 0x50, 4, None, False)
    machine.load(asm.mov_r32(EBX, MMIO_ADDR) + asm.mov_r32(EAX, 1) + asm.store32(EBX, EAX, 0x50)
                 + asm.store32(EBX, EAX, 0x50) + asm.HLT)
    assert type(machine.vcpu.run()) is Hlt
    assert count(fd) == 2
    machine.vm.unregister_ioevent(fd, MMIO_ADDR + 0x50, 4, None, False)


def test_ioeventfd_collisions_and_removal(machine, efd):
    vm, a, b = machine.vm, efd(), efd()
    vm.register_ioevent(a, 0x600, 2, 1, True)
    vm.register_ioevent(b, 0x600, 2, 2, True)  # another value on the same port is fine
    vm.register_ioevent(b, 0x600, 2, 1, False)  # the MMIO bus is another bus
    with refused(errno.EEXIST):
        vm.register_ioevent(b, 0x600, 2, 1, True)  # same value
    with refused(errno.EEXIST):
        vm.register_ioevent(b, 0x600, 2, None, True)  # a wildcard overlaps every value
    with refused(errno.EEXIST):
        vm.register_ioevent(b, 0x600, 0, None, True)  # length 0 matches any access
    with refused(errno.ENOENT):
        vm.unregister_ioevent(a, 0x600, 2, 3, True)
    vm.unregister_ioevent(a, 0x600, 2, 1, True)
    vm.register_ioevent(a, 0x600, 2, 1, True)


@pytest.mark.parametrize("length, datamatch", [(3, None), (16, None), (0, 5)])
def test_ioeventfd_invalid_shapes(machine, efd, length, datamatch):
    with refused(errno.EINVAL):
        machine.vm.register_ioevent(efd(), 0x700, length, datamatch, True)
