"""domain.memory.GuestMemory's bounds: the low-region fast path, the other regions, release."""

import pytest

from domain.errors import GuestMemoryError
from domain.memory import PAGE_SIZE, GuestMemory


def two_regions() -> GuestMemory:
    return GuestMemory([(0, bytearray(4 * PAGE_SIZE)), (0x100000, bytearray(2 * PAGE_SIZE))])


def test_ranges_inside_one_region_and_not_across():
    mem = two_regions()
    assert mem.contains(0, 4 * PAGE_SIZE) and mem.contains(0x100000 + PAGE_SIZE, PAGE_SIZE)
    assert not mem.contains(4 * PAGE_SIZE - 1, 2)  # runs off the low region into the hole
    assert not mem.contains(0x100000 + 2 * PAGE_SIZE - 1, 2)
    assert not mem.contains(-1, 1) and not mem.contains(0, -1)
    mem.write(0x100000 + 8, b"abc")
    assert mem.read(0x100000 + 8, 3) == b"abc"
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        mem.view(4 * PAGE_SIZE - 1, 2)


def test_nothing_is_reachable_after_release():
    mem = two_regions()
    mem.release()
    assert not mem.contains(0, 1) and not mem.contains(0x100000, 1)
    with pytest.raises(GuestMemoryError):
        mem.view(0, 1)
    with pytest.raises(GuestMemoryError):
        mem.read_u16(0x100000)
