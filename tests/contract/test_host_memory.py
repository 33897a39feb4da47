"""MmapAllocator: the MemoryAllocator port on host mmaps."""

from __future__ import annotations

import os

import pytest

from adapters.fake.hypervisor import FakeHypervisor
from adapters.host.memory import MmapAllocator
from domain.errors import HostResourceError, InvalidArgumentError

MiB = 1 << 20


def test_anonymous_regions_are_zeroed_and_writable():
    alloc = MmapAllocator()
    mem = alloc.allocate([(0, 2 * MiB), (1 << 32, MiB)])
    try:
        assert [(r.gpa, r.size) for r in mem.regions] == [(0, 2 * MiB), (1 << 32, MiB)]
        assert mem.read(0x1000, 16) == bytes(16)
        mem.write((1 << 32) + 8, b"high")
        assert mem.read((1 << 32) + 8, 4) == b"high"
    finally:
        alloc.free(mem)


def test_backing_file_is_mapped_copy_on_write_in_layout_order(tmp_path):
    path = tmp_path / "ram"
    page = 4096
    # Two regions listed high first: file offset 0 belongs to the high region.
    path.write_bytes(b"H" * page + b"L" * 2 * page)
    alloc = MmapAllocator()
    mem = alloc.allocate([(1 << 32, page), (0, 2 * page)], backing_file=str(path))
    try:
        assert mem.read(1 << 32, 4) == b"HHHH"
        assert mem.read(0, 4) == b"LLLL" and mem.read(page, 4) == b"LLLL"
        mem.write(0, b"guest wrote this")
        assert mem.read(0, 16) == b"guest wrote this"
    finally:
        alloc.free(mem)
    assert path.read_bytes() == b"H" * page + b"L" * 2 * page  # the file never changes


def test_backing_file_too_short_is_refused(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(bytes(4096))
    with pytest.raises(HostResourceError, match="holds 4096 bytes"):
        MmapAllocator().allocate([(0, 8192)], backing_file=str(path))


def test_missing_backing_file_is_a_host_resource_error(tmp_path):
    with pytest.raises(HostResourceError, match="No such file"):
        MmapAllocator().allocate([(0, 4096)], backing_file=str(tmp_path / "nope"))


@pytest.mark.parametrize("layout", [[(0, 4095)], [(1, 4096)], [(0, 0)], [(0, 8192), (4096, 4096)]])
def test_bad_layouts_are_refused(layout):
    with pytest.raises(InvalidArgumentError):
        MmapAllocator().allocate(layout)


def test_free_releases_views_and_refuses_a_second_free():
    alloc = MmapAllocator()
    mem = alloc.allocate([(0, MiB)])
    view = mem.regions[0].view
    alloc.free(mem)
    with pytest.raises(ValueError):
        view[0]  # released
    assert mem.regions == ()
    with pytest.raises(InvalidArgumentError):
        alloc.free(mem)


def test_free_while_a_vm_maps_the_memory_fails_then_succeeds_after_close():
    alloc = MmapAllocator()
    mem = alloc.allocate([(0, MiB)])
    vm = FakeHypervisor().create_vm()
    vm.set_memory_region(0, 0, mem.regions[0].view)
    with pytest.raises(HostResourceError, match="close the VM"):
        alloc.free(mem)
    vm.close()
    alloc.free(mem)


def test_kvm_pins_memory_until_the_vm_is_closed():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is missing")
    from adapters.kvm.hypervisor import KvmHypervisor

    hv = KvmHypervisor()
    alloc = MmapAllocator()
    mem = alloc.allocate([(0, MiB)])
    vm = hv.create_vm()
    vm.set_memory_region(0, 0, mem.regions[0].view)
    with pytest.raises(HostResourceError):
        alloc.free(mem)
    vm.close()
    alloc.free(mem)
    hv.close()


test_kvm_pins_memory_until_the_vm_is_closed = pytest.mark.kvm(test_kvm_pins_memory_until_the_vm_is_closed)


def test_discard_returns_whole_pages_only():
    from adapters.host.memory import MmapAllocator

    a = MmapAllocator()
    m = a.allocate([(0, 1 << 20)])
    m.write(0x2000, b"x" * 0x2000)
    a.discard(m, 0x2000, 0x1000)  # the balloon's page at 0x2000
    assert m.read(0x2000, 0x1000) == bytes(0x1000)
    assert m.read(0x3000, 1) == b"x"
    a.discard(m, 0x3800, 0x1000)  # no whole page in range: nothing is lost
    assert m.read(0x3000, 0x1000) == b"x" * 0x1000
    a.free(m)


# --- memory backend: -mem-path, mem-share, -mem-prealloc, dump-guest-core ---------------------

def _address(mem) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(mem.regions[0].view))


def _smaps_flags(mem) -> set[str]:
    """VmFlags of the mapping behind guest RAM, from /proc/self/smaps."""
    addr = _address(mem)
    flags: set[str] = set()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                flags = set(line.split()[1:])
    return flags


def test_mem_path_file_shared_writes_reach_the_file(tmp_path):
    from domain.config import MemoryConfig

    path = tmp_path / "ram"
    alloc = MmapAllocator()
    mem = alloc.allocate([(0, 2 * MiB), (1 << 32, MiB)],
                         backend=MemoryConfig(size=3 * MiB, mem_path=str(path), mem_share=True))
    try:
        mem.write(0x10, b"low")
        mem.write((1 << 32) + 0x20, b"high")
        assert "sh" in _smaps_flags(mem)
        data = path.read_bytes()
        assert len(data) == 3 * MiB  # created and grown to the RAM size
        assert data[0x10:0x13] == b"low" and data[2 * MiB + 0x20:2 * MiB + 0x24] == b"high"
        # The balloon gives pages back: a shared file's pages are freed, the guest reads zeros.
        alloc.discard(mem, 0, 2 * MiB)
        assert mem.read(0x10, 3) == bytes(3) and path.read_bytes()[0x10:0x13] == bytes(3)
    finally:
        alloc.free(mem)


def test_mem_path_file_private_keeps_the_file_unchanged(tmp_path):
    from domain.config import MemoryConfig

    path = tmp_path / "ram"
    path.write_bytes(b"F" * MiB)  # an existing file keeps its content and grows
    mem = None
    alloc = MmapAllocator()
    try:
        mem = alloc.allocate([(0, 2 * MiB)], backend=MemoryConfig(size=2 * MiB, mem_path=str(path)))
        assert mem.read(0, 2) == b"FF" and mem.read(MiB, 2) == bytes(2)
        mem.write(0, b"guest")
        assert "sh" not in _smaps_flags(mem)
    finally:
        if mem is not None:
            alloc.free(mem)
    assert path.read_bytes()[:5] == b"FFFFF" and path.stat().st_size == 2 * MiB


def test_mem_path_directory_gets_an_unlinked_file(tmp_path):
    from domain.config import MemoryConfig

    alloc = MmapAllocator()
    mem = alloc.allocate([(0, MiB)], backend=MemoryConfig(size=MiB, mem_path=str(tmp_path), mem_share=True))
    try:
        mem.write(0, b"x")
        assert list(tmp_path.iterdir()) == []  # nothing left to clean up, nothing to open
        assert mem.read(0, 1) == b"x"
    finally:
        alloc.free(mem)


def test_prealloc_populates_and_dump_off_marks_dontdump(tmp_path):
    from domain.config import MemoryConfig

    alloc = MmapAllocator()
    mem = alloc.allocate([(0, 4 * MiB)], backend=MemoryConfig(size=4 * MiB, prealloc=True, dump_guest_core=False))
    try:
        assert "dd" in _smaps_flags(mem)
        with open("/proc/self/pagemap", "rb") as f:  # every page present (bit 63) before any use
            f.seek(_address(mem) // 4096 * 8)
            entries = f.read(4 * MiB // 4096 * 8)
        present = sum(int.from_bytes(entries[i:i + 8], "little") >> 63 for i in range(0, len(entries), 8))
        assert present == 4 * MiB // 4096
    finally:
        alloc.free(mem)


def test_mem_path_that_cannot_be_created_is_a_host_resource_error(tmp_path):
    from domain.config import MemoryConfig

    with pytest.raises(HostResourceError, match="cannot map guest RAM .*No such file"):
        MmapAllocator().allocate([(0, MiB)], backend=MemoryConfig(size=MiB, mem_path=str(tmp_path / "no" / "ram")))


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="this kernel has no transparent huge pages")
def test_anonymous_ram_asks_for_transparent_huge_pages_when_told():
    for huge, flagged in ((True, True), (False, False)):
        alloc = MmapAllocator(huge_pages=huge)
        mem = alloc.allocate([(0, 4 * MiB)])
        try:
            assert ("hg" in _smaps_flags(mem)) is flagged  # MADV_HUGEPAGE, as QEMU's RAM blocks
        finally:
            alloc.free(mem)
