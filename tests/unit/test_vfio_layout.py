"""The VFIO structs and constants cffi compiled from <linux/vfio.h>, and the parsing over them.

Sizes and offsets come from the compiler; these tests pin the ABI facts the code relies on (argsz
first, flexible arrays at the end, ioctl numbering) and parse buffers laid out through the same
structs, the way the kernel fills them.
"""

import pytest

kernel = pytest.importorskip("adapters.vfio.kernel")
if not kernel.available():  # pragma: no cover - depends on the build
    pytest.skip("adapters.vfio._vfio_cffi is not built", allow_module_level=True)
ffi, lib = kernel.ffi, kernel.lib

INFO_STRUCTS = ["vfio_group_status", "vfio_device_info", "vfio_region_info", "vfio_irq_info", "vfio_irq_set",
                "vfio_iommu_type1_info", "vfio_iommu_type1_dma_map", "vfio_iommu_type1_dma_unmap"]


@pytest.mark.parametrize("name", INFO_STRUCTS)
def test_argsz_and_flags_lead_every_ioctl_struct(name):
    ct = f"struct {name}"
    assert (ffi.offsetof(ct, "argsz"), ffi.offsetof(ct, "flags")) == (0, 4)
    assert ffi.sizeof(ffi.typeof(ct).fields[0][1].type) == 4


def test_u64_fields_are_naturally_aligned():
    for ct, fields in [("struct vfio_region_info", ["size", "offset"]),
                       ("struct vfio_iommu_type1_dma_map", ["vaddr", "iova", "size"]),
                       ("struct vfio_iommu_type1_dma_unmap", ["iova", "size"]),
                       ("struct vfio_iommu_type1_info", ["iova_pgsizes"])]:
        for f in fields:
            assert ffi.offsetof(ct, f) % 8 == 0, (ct, f)


def test_struct_sizes_match_the_uapi():
    # The sizes every VFIO user (QEMU, rust-vmm) agrees on; a header that changed them would be
    # a new ABI, which the API version check would also catch.
    assert ffi.sizeof("struct vfio_group_status") == 8
    assert ffi.sizeof("struct vfio_region_info") == 32
    assert ffi.sizeof("struct vfio_irq_info") == 16
    assert ffi.sizeof("struct vfio_iommu_type1_dma_map") == 32
    assert ffi.sizeof("struct vfio_info_cap_header") == 8


def test_flexible_arrays_start_where_the_fixed_part_ends():
    assert ffi.offsetof("struct vfio_irq_set", "data") == 20
    sparse = "struct vfio_region_info_cap_sparse_mmap"
    assert ffi.offsetof(sparse, "areas") == 16  # header, nr_areas, reserved
    assert ffi.offsetof(sparse, "areas") % 8 == 0
    iova = "struct vfio_iommu_type1_info_cap_iova_range"
    assert ffi.offsetof(iova, "iova_ranges") == 16


def test_ioctl_numbers_follow_the_vfio_base():
    # _IO(VFIO_TYPE=';', VFIO_BASE=100 + n), as the header documents each ioctl.
    numbered = {0: "VFIO_GET_API_VERSION", 1: "VFIO_CHECK_EXTENSION", 2: "VFIO_SET_IOMMU",
                3: "VFIO_GROUP_GET_STATUS", 4: "VFIO_GROUP_SET_CONTAINER", 5: "VFIO_GROUP_UNSET_CONTAINER",
                6: "VFIO_GROUP_GET_DEVICE_FD", 7: "VFIO_DEVICE_GET_INFO", 8: "VFIO_DEVICE_GET_REGION_INFO",
                9: "VFIO_DEVICE_GET_IRQ_INFO", 10: "VFIO_DEVICE_SET_IRQS", 11: "VFIO_DEVICE_RESET",
                12: "VFIO_IOMMU_GET_INFO", 13: "VFIO_IOMMU_MAP_DMA", 14: "VFIO_IOMMU_UNMAP_DMA"}
    for n, name in numbered.items():
        assert getattr(lib, name) == (ord(";") << 8) | (100 + n), name
    assert lib.VFIO_API_VERSION == 0


def test_pci_indices_come_from_the_header():
    ix = kernel.pci_indices()
    assert ix.bars == tuple(range(6))
    assert (ix.rom, ix.config) == (lib.VFIO_PCI_ROM_REGION_INDEX, lib.VFIO_PCI_CONFIG_REGION_INDEX) == (6, 7)
    assert (ix.intx, ix.msi, ix.msix) == (0, 1, 2)
    assert lib.VFIO_PCI_NUM_REGIONS == 9 and lib.VFIO_PCI_NUM_IRQS == 5


# --- parsing -------------------------------------------------------------------------------------

def test_group_status_flags():
    assert kernel.parse_group_status(0) == kernel.GroupStatus(False, False)
    assert kernel.parse_group_status(lib.VFIO_GROUP_FLAGS_VIABLE) == kernel.GroupStatus(True, False)
    both = lib.VFIO_GROUP_FLAGS_VIABLE | lib.VFIO_GROUP_FLAGS_CONTAINER_SET
    assert kernel.parse_group_status(both) == kernel.GroupStatus(True, True)


def test_irq_info_flags():
    intx = kernel.parse_irq_info(0, 1, lib.VFIO_IRQ_INFO_EVENTFD | lib.VFIO_IRQ_INFO_MASKABLE
                                 | lib.VFIO_IRQ_INFO_AUTOMASKED)
    assert (intx.eventfd, intx.maskable, intx.automasked, intx.resizable) == (True, True, True, True)
    msi = kernel.parse_irq_info(1, 8, lib.VFIO_IRQ_INFO_EVENTFD | lib.VFIO_IRQ_INFO_NORESIZE)
    assert (msi.index, msi.count, msi.automasked, msi.resizable) == (1, 8, False, False)


def _region_buffer(areas, *, flags=None, corrupt_next=None, nr_areas=None, size=None):
    """A vfio_region_info as the kernel fills it: the fixed part, then a sparse-mmap capability."""
    base = ffi.sizeof("struct vfio_region_info")
    cap_areas = ffi.offsetof("struct vfio_region_info_cap_sparse_mmap", "areas")
    total = size or base + cap_areas + len(areas) * ffi.sizeof("struct vfio_region_sparse_mmap_area")
    buf = ffi.new("char[]", total)
    info = ffi.cast("struct vfio_region_info *", buf)
    info.argsz, info.index, info.size, info.offset = total, 2, 0x10000, 2 << 40
    info.flags = flags if flags is not None else (lib.VFIO_REGION_INFO_FLAG_READ | lib.VFIO_REGION_INFO_FLAG_WRITE
                                                  | lib.VFIO_REGION_INFO_FLAG_MMAP | lib.VFIO_REGION_INFO_FLAG_CAPS)
    info.cap_offset = base
    cap = ffi.cast("struct vfio_region_info_cap_sparse_mmap *", buf + base)
    cap.header.id, cap.header.version = lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1
    cap.header.next = corrupt_next or 0
    cap.nr_areas = len(areas) if nr_areas is None else nr_areas
    for i, (off, sz) in enumerate(areas):
        cap.areas[i].offset, cap.areas[i].size = off, sz
    return buf, total


def test_region_info_with_sparse_mmap():
    buf, total = _region_buffer([(0, 0x2000), (0x3000, 0xD000)])
    r = kernel.parse_region_info(buf, total)
    assert (r.index, r.size, r.offset) == (2, 0x10000, 2 << 40)
    assert (r.readable, r.writable, r.mappable) == (True, True, True)
    assert r.sparse == ((0, 0x2000), (0x3000, 0xD000))


def test_region_info_without_caps_has_no_sparse_areas():
    buf, total = _region_buffer([(0, 0x1000)], flags=lib.VFIO_REGION_INFO_FLAG_READ)
    r = kernel.parse_region_info(buf, total)
    assert r.sparse is None and not r.mappable and not r.writable


def test_cap_chain_loops_and_lies_stop_the_walk():
    base = ffi.sizeof("struct vfio_region_info")
    buf, total = _region_buffer([(0, 0x1000)], corrupt_next=base)  # points at itself
    assert kernel.parse_region_info(buf, total).sparse == ((0, 0x1000),)
    # nr_areas larger than the buffer holds: only the areas inside it are read.
    buf, total = _region_buffer([(0, 0x1000)], nr_areas=1000)
    assert kernel.parse_region_info(buf, total).sparse == ((0, 0x1000),)
    # A chain starting beyond the buffer finds nothing.
    assert kernel.walk_caps(buf, total, total + 8) == {}


def test_iova_ranges_capability():
    base = ffi.sizeof("struct vfio_iommu_type1_info")
    start = ffi.offsetof("struct vfio_iommu_type1_info_cap_iova_range", "iova_ranges")
    total = base + start + 2 * ffi.sizeof("struct vfio_iova_range")
    buf = ffi.new("char[]", total)
    cap = ffi.cast("struct vfio_iommu_type1_info_cap_iova_range *", buf + base)
    cap.header.id = lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
    cap.nr_iovas = 2
    cap.iova_ranges[0].start, cap.iova_ranges[0].end = 0, 0xFEDFFFFF
    cap.iova_ranges[1].start, cap.iova_ranges[1].end = 0xFEF00000, (1 << 48) - 1
    caps = kernel.walk_caps(buf, total, base)
    assert kernel.iova_ranges(buf, total, caps[lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE]) == (
        (0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1))


def test_irq_set_buffer_with_eventfds():
    buf = kernel.irq_set_buffer(lib.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 1, 3, [10, -1, 12])
    s = ffi.cast("struct vfio_irq_set *", buf)
    assert s.argsz == ffi.sizeof("struct vfio_irq_set") + 12 == len(ffi.buffer(buf))
    assert s.flags == lib.VFIO_IRQ_SET_ACTION_TRIGGER | lib.VFIO_IRQ_SET_DATA_EVENTFD
    assert (s.index, s.start, s.count) == (2, 1, 3)
    fds = ffi.cast("int32_t *", buf + ffi.offsetof("struct vfio_irq_set", "data"))
    assert [fds[i] for i in range(3)] == [10, -1, 12]


def test_irq_set_buffer_without_data():
    buf = kernel.irq_set_buffer(lib.VFIO_IRQ_SET_ACTION_UNMASK, 0, 0, 1, None)
    s = ffi.cast("struct vfio_irq_set *", buf)
    assert s.argsz == ffi.sizeof("struct vfio_irq_set")
    assert s.flags == lib.VFIO_IRQ_SET_ACTION_UNMASK | lib.VFIO_IRQ_SET_DATA_NONE
    assert (s.index, s.start, s.count) == (0, 0, 1)
