"""What only the fake has: its guest helpers and its documented idling (no KVM equivalent)."""

from __future__ import annotations

import os

import pytest

from adapters.fake.hypervisor import FakeHypervisor
from domain.errors import GuestMemoryError
from domain.vcpu_exit import Interrupted, InternalError
from tests.contract.conftest import Machine
from tests.contract.longmode import CODE_ADDR, enter
from tests.contract.test_kick import JOIN, wait_until_running
from tests.contract.test_memory_slots import SLOT1_GPA, extra_ram


@pytest.fixture
def fake():
    m = Machine(FakeHypervisor())
    yield m
    m.close()


def test_kind_is_recorded():
    assert FakeHypervisor().kind == "test"
    assert FakeHypervisor(kind="other").kind == "other"


def test_unsupported_code_idles_until_kicked(fake):
    fake.load(b"\x0f\x0b")  # ud2: not in the fake's subset
    thread, result = fake.run_in_thread()
    wait_until_running(fake, thread)
    assert thread.is_alive()
    fake.vcpu.kick()
    thread.join(JOIN)
    assert type(result[0]) is Interrupted
    assert fake.vcpu.get_regs().rip == CODE_ADDR  # it never got past the instruction


def test_fetch_outside_ram_is_an_emulation_failure(fake):
    enter(fake.vcpu, fake.memory, "long", 0x4000_0000)
    exit_ = fake.vcpu.run()
    assert type(exit_) is InternalError and exit_.suberror == 1


def test_guest_write_lands_in_ram_and_in_the_dirty_log(fake):
    view = extra_ram(fake)
    fake.vm.set_memory_region(1, SLOT1_GPA, view, log_dirty=True)
    fake.vm.guest_write(SLOT1_GPA + 0x1FFE, b"abcd")  # straddles pages 1 and 2
    fake.vm.guest_touch_pages([SLOT1_GPA + 0x5000, SLOT1_GPA + 0x5FFF])
    assert bytes(view[0x1FFE:0x2002]) == b"abcd"
    assert fake.vm.get_dirty_log(1) == bytes([0b0010_0110, 0])
    with pytest.raises(GuestMemoryError):
        fake.vm.guest_write(0x4000_0000, b"x")


def test_guest_write_to_rom_is_refused(fake):
    fake.vm.set_memory_region(1, SLOT1_GPA, extra_ram(fake), readonly=True)
    with pytest.raises(GuestMemoryError):
        fake.vm.guest_write(SLOT1_GPA, b"x")


def test_irq_lines_and_irqfd_signals_are_recorded():
    vm = FakeHypervisor().create_vm()
    vm.create_irqchip()
    vm.set_irq_line(4, True)
    vm.set_irq_line(4, False)
    vm.set_irq_line(9, True)
    assert vm.irq_levels == {4: False, 9: True}
    assert vm.irq_log == [(4, True), (4, False), (9, True)]
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.register_irqfd(fd, 5)
        os.eventfd_write(fd, 1)
        os.eventfd_write(fd, 1)
        assert vm.poll_irqfds() == {5: 2}
        assert vm.poll_irqfds() == {}
        assert vm.irqfd_signals == {5: 2}
    finally:
        os.close(fd)


def test_state_keeps_irq_levels(fake):
    vm = FakeHypervisor().create_vm()
    vm.create_irqchip()
    vm.set_irq_line(3, True)
    other = FakeHypervisor().create_vm()
    other.create_irqchip()
    other.restore_state(vm.save_state())
    assert other.irq_levels == {3: True}
