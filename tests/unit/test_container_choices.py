"""The composition root picks adapters by -accel: the same use cases, different hosts."""

from application.container import Container
from domain.config import ACCEL_KVM, ACCEL_TEST


def _allocator(accel: str):
    c = Container()
    c.accel.override(accel)
    return c.allocator()


def test_guest_ram_asks_for_huge_pages_on_either_hypervisor():
    assert _allocator(ACCEL_KVM)._huge_pages is True
    assert _allocator(ACCEL_TEST)._huge_pages is True


def test_one_allocator_per_container():
    c = Container()
    c.accel.override(ACCEL_TEST)
    assert c.allocator() is c.allocator()
