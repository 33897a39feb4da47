"""vfio-pci on the q35 bus: BARs virtualised, the rest of config space forwarded to the VFIO
config region; MSI/MSI-X state reported; the MSI-X table shadowed and kept out of the mmaps.

The device behind it is an in-memory VfioDevice (what vfio-pci shows of a NIC-like function).
"""

import struct

import pytest

from domain.devices.pci.device import BarRegion, PciDevice
from domain.devices.pci.vfio_pci import ROM_INDEX, MsiVector, VfioPciFunction, subtract
from domain.errors import HostResourceError
from domain.ports import VfioDevice, VfioIrqInfo, VfioPciIndices, VfioRegionInfo

IX = VfioPciIndices(bars=(0, 1, 2, 3, 4, 5), rom=6, config=7, intx=0, msi=1, msix=2)
GiB = 1 << 30


class FakeVfioDevice:
    """Config space as vfio-pci presents it, BAR contents as plain bytes."""

    host = "0000:1a:00.3"
    indices = IX
    num_regions = 9
    num_irqs = 5
    can_reset = True
    closed = False

    def __init__(self):
        cfg = bytearray(256)
        struct.pack_into("<HH", cfg, 0, 0x8086, 0x10FB)
        struct.pack_into("<H", cfg, 0x06, 0x10)  # status: capability list
        struct.pack_into("<I", cfg, 0x10, 0x0)  # BAR0: 32-bit memory
        struct.pack_into("<I", cfg, 0x18, 0xC)  # BAR2: 64-bit prefetchable (BAR3 its top half)
        struct.pack_into("<I", cfg, 0x20, 0x1)  # BAR4: IO
        cfg[0x34] = 0x50
        cfg[0x50:0x52] = bytes((0x05, 0x70))  # MSI, 64-bit, 4 vectors capable
        struct.pack_into("<H", cfg, 0x52, 0x80 | (2 << 1))
        cfg[0x70:0x72] = bytes((0x11, 0x00))  # MSI-X: 4 entries, table BAR0+0x2000, PBA BAR0+0x3000
        struct.pack_into("<HII", cfg, 0x72, 3, 0x2000 | 0, 0x3000 | 0)
        self.config = cfg
        self.sizes = {0: 0x4000, 1: 0, 2: 8 * GiB, 3: 0, 4: 0x20, 5: 0, 6: 0x10000, 7: 256, 8: 0}
        self.bars = {0: bytearray(0x4000), 4: bytearray(0x20), 6: bytearray(b"\x55\xaa" + bytes(0xFFFE))}
        self.writes: list[tuple[int, int, bytes]] = []

    def region_info(self, index):
        size = self.sizes[index]
        areas = ((0, size),) if index in (0, 2) else ()
        return VfioRegionInfo(index, size, True, index != 6, bool(areas), areas)

    def region_read(self, index, offset, length):
        data = self.config if index == 7 else self.bars[index]
        assert offset + length <= len(data)
        return bytes(data[offset:offset + length])

    def region_write(self, index, offset, data):
        self.writes.append((index, offset, bytes(data)))
        target = self.config if index == 7 else self.bars[index]
        target[offset:offset + len(data)] = data

    def region_mmap(self, index):
        raise NotImplementedError

    def irq_info(self, index):
        return VfioIrqInfo(index, (1, 4, 4, 1, 1)[index], True, index == 0, index == 0, index != 1)

    def set_irq_eventfds(self, index, fds, start=0): ...

    def disable_irqs(self, index): ...

    def unmask_irq(self, index, subindex=0): ...

    def reset(self): ...

    def close(self):
        self.closed = True

    release = close


@pytest.fixture
def dev():
    return FakeVfioDevice()


@pytest.fixture
def events():
    return {"bars": [], "irqs": []}


@pytest.fixture
def fn(dev, events):
    f = VfioPciFunction(dev)
    f.on_bar_moved = lambda d, bar, old, new: events["bars"].append((bar.index, old, new))
    f.on_irq_changed = lambda d, kind, v: events["irqs"].append((kind, v))
    return f


def test_fake_implements_the_port(dev):
    assert isinstance(dev, VfioDevice)


def test_discovers_bars_and_capabilities(fn):
    assert sorted(fn.bars) == [0, 2, 4]
    assert (fn.bars[0].size, fn.bars[0].mem64, fn.bars[0].io) == (0x4000, False, False)
    assert (fn.bars[2].size, fn.bars[2].mem64, fn.bars[2].prefetch) == (8 * GiB, True, True)
    assert (fn.bars[4].size, fn.bars[4].io) == (0x20, True)
    assert fn.rom.size == 0x10000
    assert fn.msi_cap == 0x50
    assert (fn.msix.cap, fn.msix.entries, fn.msix.table_bar, fn.msix.table_offset, fn.msix.pba_offset) == (
        0x70, 4, 0, 0x2000, 0x3000)


def test_identity_is_forwarded(fn):
    assert isinstance(fn, PciDevice) and fn.name == "0000:1a:00.3"
    assert (fn.vendor_id, fn.device_id) == (0x8086, 0x10FB)
    assert fn.read_config(0, 4) == 0x10FB8086
    assert fn.read_config(2, 2) == 0x10FB


def test_bar_registers_are_virtual_and_start_unprogrammed(fn, dev):
    dev.config[0x10:0x14] = b"\x00\x00\xe0\xfe"  # the host's address must never show
    fn2 = VfioPciFunction(dev)
    assert fn2.read_config(0x10, 4) == 0
    assert fn.read_config(0x18, 4) == 0xC and fn.read_config(0x1C, 4) == 0
    assert fn.read_config(0x20, 4) == 0x1
    assert fn.read_config(0x14, 4) == 0 and fn.read_config(0x24, 4) == 0  # unimplemented


def test_bar_sizing(fn, dev):
    writes_before = list(dev.writes)
    for off in (0x10, 0x18, 0x1C, 0x20, 0x14):
        fn.write_config(off, 4, 0xFFFFFFFF)
    assert fn.read_config(0x10, 4) == 0xFFFFC000  # 16 KiB, 32-bit memory
    assert fn.read_config(0x18, 4) == 0x0000000C  # 8 GiB: nothing to size in the low half
    assert fn.read_config(0x1C, 4) == 0xFFFFFFFE  # ... the top half says 8 GiB
    assert fn.read_config(0x20, 4) == 0xFFFFFFE1  # 32 bytes of IO
    assert fn.read_config(0x14, 4) == 0
    assert dev.writes == writes_before  # nothing reached the device


def test_rom_bar_sizing_and_enable(fn, events):
    fn.write_config(0x30, 4, 0xFFFFFFFE)
    assert fn.read_config(0x30, 4) == 0xFFFF0000
    fn.write_config(0x30, 4, 0xFEB00001)
    assert fn.read_config(0x30, 4) == 0xFEB00001
    assert events["bars"] == []  # memory decoding is still off
    fn.write_config(0x04, 2, 0x2)
    assert (ROM_INDEX, None, 0xFEB00000) in events["bars"]
    assert fn.bar_read(ROM_INDEX, 0, 2) == b"\x55\xaa"


def test_bars_are_placed_when_decoding_turns_on(fn, dev, events):
    fn.write_config(0x10, 4, 0xFE000000)
    fn.write_config(0x18, 4, 0x0)
    fn.write_config(0x1C, 4, 0x4)  # 64-bit BAR at 16 GiB
    fn.write_config(0x20, 4, 0xC000)
    assert events["bars"] == []
    fn.write_config(0x04, 2, 0x3)  # IO + memory
    assert (0x04, b"\x03\x00") in [(o, d) for i, o, d in dev.writes if i == 7]  # forwarded too
    assert sorted(events["bars"]) == [(0, None, 0xFE000000), (2, None, 16 * GiB), (4, None, 0xC000)]
    events["bars"].clear()
    fn.write_config(0x10, 4, 0xFD000000)  # moved while decoding
    assert events["bars"] == [(0, 0xFE000000, 0xFD000000)]
    events["bars"].clear()
    fn.write_config(0x04, 1, 0x1)  # memory decoding off (a byte write), IO stays
    assert sorted(events["bars"]) == [(0, 0xFD000000, None), (2, 16 * GiB, None)]


def test_sizing_pattern_is_not_a_placement(fn, events):
    fn.write_config(0x04, 2, 0x2)
    fn.write_config(0x10, 4, 0xFFFFFFFF)
    assert events["bars"] == []


def test_partial_writes_to_a_bar_merge(fn):
    fn.write_config(0x10, 4, 0xFE000000)
    fn.write_config(0x12, 2, 0xFD10)
    assert fn.read_config(0x10, 4) == 0xFD100000
    assert fn.read_config(0x13, 1) == 0xFD


def test_other_registers_are_forwarded(fn, dev):
    fn.write_config(0x3C, 1, 11)  # interrupt line
    assert dev.writes[-1] == (7, 0x3C, b"\x0b")
    assert fn.read_config(0x3C, 1) == 11


def test_invalid_accesses(fn, dev):
    assert fn.read_config(0x11, 2) == 0xFFFF  # misaligned
    assert fn.read_config(0x100, 4) == 0xFFFFFFFF  # beyond this device's 256 bytes
    n = len(dev.writes)
    fn.write_config(0x3D, 2, 0)
    fn.write_config(0x200, 4, 0)
    assert len(dev.writes) == n


# --- interrupts ----------------------------------------------------------------------------------

def test_msi_enable_reports_vectors(fn, events):
    fn.write_config(0x54, 4, 0xFEE01000)
    fn.write_config(0x58, 4, 0)
    fn.write_config(0x5C, 2, 0x4041)
    assert events["irqs"] == []  # not enabled yet
    fn.write_config(0x52, 2, 0x80 | (1 << 4) | 1)  # enable, 2 vectors
    kind, vectors = events["irqs"][-1]
    assert kind == "msi"
    # The device puts the vector number in the low bits of the data.
    assert vectors == [MsiVector(0xFEE01000, 0x4040, False), MsiVector(0xFEE01000, 0x4041, False)]
    n = len(events["irqs"])
    fn.write_config(0x3C, 1, 5)
    fn.write_config(0x52, 2, 0x80 | (1 << 4) | 1)  # the same again: nothing new to report
    assert len(events["irqs"]) == n
    fn.write_config(0x52, 2, 0x80)
    assert events["irqs"][-1] == ("msi", [])


def write_entry(fn, n, address, data, ctrl):
    base = 0x2000 + 16 * n
    fn.bar_write(0, base, struct.pack("<Q", address))  # a qword, as Linux writes the address
    fn.bar_write(0, base + 8, struct.pack("<I", data))
    fn.bar_write(0, base + 12, struct.pack("<I", ctrl))


def test_msix_table_is_shadowed_and_reported(fn, dev, events):
    write_entry(fn, 1, 0xFEE02000, 0x4055, 0)
    assert dev.bars[0][0x2010:0x2020] == bytes(16)  # never reached the real table
    assert fn.bar_read(0, 0x2010, 8) == struct.pack("<Q", 0xFEE02000)
    assert fn.bar_read(0, 0x2018, 4) == struct.pack("<I", 0x4055)
    assert fn.bar_read(0, 0x200C, 4) == b"\x01\x00\x00\x00"  # entries start masked
    assert events["irqs"] == []
    fn.write_config(0x72, 2, 0x8000 | 3)  # MSI-X enable
    kind, vectors = events["irqs"][-1]
    assert kind == "msix" and len(vectors) == 4
    assert vectors[1] == MsiVector(0xFEE02000, 0x4055, False)
    assert vectors[0].masked and vectors[2].masked
    assert fn.read_config(0x72, 2) & 0xC000 == 0x8000
    assert fn.read_config(0x72, 2) & 0x7FF == 3  # the table size still comes from the device
    fn.write_config(0x72, 2, 0xC000 | 3)  # function mask
    assert all(v.masked for v in events["irqs"][-1][1])
    fn.write_config(0x72, 2, 0x8000 | 3)
    fn.bar_write(0, 0x2000 + 16 + 12, b"\x01\x00\x00\x00")  # the guest masks vector 1
    assert events["irqs"][-1][1][1].masked
    fn.write_config(0x70, 4, 0)  # a dword write over id/next/ctrl disables it
    assert events["irqs"][-1] == ("msix", [])
    assert fn.read_config(0x72, 2) & 0xC000 == 0


def test_msix_table_writes_follow_the_spec(fn):
    write_entry(fn, 0, 0xFEE01003, 0x41, 0xFFFFFFFE)
    assert fn.bar_read(0, 0x2000, 4) == struct.pack("<I", 0xFEE01000)  # dword-aligned address
    assert fn.bar_read(0, 0x200C, 4) == bytes(4)  # only the mask bit is writable
    fn.bar_write(0, 0x2000, b"\xff\xff")  # 2-byte and misaligned accesses are dropped
    fn.bar_write(0, 0x2002, b"\xff\xff\xff\xff")
    assert fn.bar_read(0, 0x2000, 4) == struct.pack("<I", 0xFEE01000)
    assert fn.bar_read(0, 0x2000, 2) == bytes(2)


def test_msix_vectors_fire_pend_and_deliver_on_unmask(fn):
    sent = []
    fn.send = lambda address, data: sent.append((address, data))
    write_entry(fn, 0, 0xFEE01000, 0x41, 0)
    write_entry(fn, 2, 0xFEE02000, 0x42, 1)
    assert not fn.vector_fired("msix", 0)  # not enabled: dropped
    fn.write_config(0x72, 2, 0x8000)
    assert fn.vector_fired("msix", 0) and sent == [(0xFEE01000, 0x41)]
    assert fn.vector_fired("msix", 2) and sent == [(0xFEE01000, 0x41)]  # masked: pending
    assert fn.is_pending("msix", 2)
    assert fn.bar_read(0, 0x3000, 8) == (1 << 2).to_bytes(8, "little")  # the guest sees it in the PBA
    fn.bar_write(0, 0x3000, bytes(8))  # the PBA is read-only
    assert fn.is_pending("msix", 2)
    fn.bar_write(0, 0x2000 + 2 * 16 + 12, bytes(4))  # unmask: delivered now
    assert sent[-1] == (0xFEE02000, 0x42) and not fn.is_pending("msix", 2)
    assert fn.bar_read(0, 0x3000, 8) == bytes(8)
    fn.write_config(0x72, 2, 0xC000)  # function mask: everything pends
    fn.vector_fired("msix", 0)
    assert fn.is_pending("msix", 0) and len(sent) == 2
    fn.write_config(0x72, 2, 0x0000)  # disabled: the pending message is dropped
    assert not fn.is_pending("msix", 0) and len(sent) == 2
    assert not fn.vector_fired("msix", 9)


def test_msi_vector_fires_and_respects_the_mask(fn, dev, events):
    sent = []
    fn.send = lambda address, data: sent.append((address, data))
    dev.config[0x53] |= 0x01  # per-vector masking capable (MSI_FLAGS_MASKBIT)
    fn.write_config(0x54, 4, 0xFEE01000)
    fn.write_config(0x5C, 2, 0x4041)
    fn.write_config(0x52, 2, 0x180 | 1)
    assert fn.vector_fired("msi", 0) and sent == [(0xFEE01000, 0x4041)]
    fn.write_config(0x60, 4, 1)  # the guest masks vector 0
    assert events["irqs"][-1] == ("msi", [MsiVector(0xFEE01000, 0x4041, True)])
    assert fn.vector_fired("msi", 0) and len(sent) == 1 and fn.is_pending("msi", 0)
    fn.write_config(0x60, 4, 0)
    assert sent == [(0xFEE01000, 0x4041)] * 2 and not fn.is_pending("msi", 0)


def test_msix_pages_are_left_out_of_the_mmap(fn):
    assert fn.msix_windows(0) == [(0x2000, 0x1000), (0x3000, 0x1000)]
    assert fn.mmap_areas(0) == [(0, 0x2000)]
    assert fn.mmap_areas(2) == [(0, 8 * GiB)]
    assert fn.mmap_areas(4) == []


def test_no_capability_list(dev):
    dev.config[0x06] = 0
    fn = VfioPciFunction(dev)
    assert fn.msi_cap is None and fn.msix is None and fn.msix_vectors() == []


def test_capability_loops_end(dev):
    dev.config[0x71] = 0x50  # MSI-X points back to MSI
    fn = VfioPciFunction(dev)
    assert fn.msi_cap == 0x50 and fn.msix.cap == 0x70


@pytest.mark.parametrize("areas, holes, out", [
    ([(0, 0x4000)], [(0x1000, 0x1000)], [(0, 0x1000), (0x2000, 0x2000)]),
    ([(0, 0x4000)], [(0, 0x4000)], []),
    ([(0, 0x1000), (0x3000, 0x1000)], [(0x800, 0x3000)], [(0, 0x800), (0x3800, 0x800)]),
    ([(0x1000, 0x1000)], [], [(0x1000, 0x1000)]),
])
def test_subtract(areas, holes, out):
    assert subtract(areas, holes) == out


def test_bar_regions_on_the_bus_reach_the_device(fn, dev):
    region = BarRegion(fn, 0)
    region.write(0x40, memoryview(bytearray(b"\xaa\xbb")))
    out = bytearray(2)
    region.read(0x40, memoryview(out))
    assert bytes(out) == b"\xaa\xbb" == bytes(dev.bars[0][0x40:0x42])


def test_firmware_placement_and_release(fn, dev, events):
    fn.set_bar_address(0, 0xFE000000)
    fn.enable_decoding()
    assert (0, None, 0xFE000000) in events["bars"]
    fn.release()
    assert (0, 0xFE000000, None) in events["bars"] and dev.closed


def test_a_bar_the_bus_cannot_model_is_a_clear_error(dev):
    struct.pack_into("<I", dev.config, 0x24, 0x4)  # a 64-bit BAR in the last slot
    dev.sizes[5] = 0x1000
    with pytest.raises(HostResourceError, match="VFIO 0000:1a:00.3: BAR 5 of 0x1000 bytes cannot be passed through"):
        VfioPciFunction(dev)
