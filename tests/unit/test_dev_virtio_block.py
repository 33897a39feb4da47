import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.devices.virtio import block as b
from domain.devices.virtio import mmio as r
from tests.unit.virtio_blk_rig import DISK, RAM, BlockRig, MemDisk, notify_fuzzed_queue

HDR = 0x20000
DATA = 0x30000
STATUS = 0x2F000


class Rig(BlockRig):
    def __init__(self, readonly=False, serial="disk-serial-0123456789ABC"):
        super().__init__(MemDisk(readonly=readonly), serial=serial)

    def request(self, rtype, sector, data_bufs, status=STATUS):
        """data_bufs: (addr, len, writable). Returns (status byte, used len)."""
        self.mem.write(HDR, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write(status, b"\xff")
        head = self.q.add_chain([(HDR, 16, False)] + data_bufs + [(status, 1, True)])
        self.drv.notify(0)
        used = self.q.take_used()
        assert [u[0] for u in used] == [head]
        return self.mem.read(status, 1)[0], used[0][1]


def test_config_space():
    rig = Rig()
    cap, size_max, seg_max = struct.unpack("<QII", rig.drv.read_config(0, 16))
    assert cap == DISK // 512 and seg_max == 14 and size_max == b.SIZE_MAX
    assert struct.unpack("<I", rig.drv.read_config(20, 4))[0] == 512
    feats = rig.drv.device_features()
    assert feats & b.VIRTIO_BLK_F_FLUSH and feats & b.VIRTIO_BLK_F_SEG_MAX and not feats & b.VIRTIO_BLK_F_RO


def test_read_into_scattered_guest_buffers():
    rig = Rig()
    status, used = rig.request(b.VIRTIO_BLK_T_IN, 2, [(DATA, 512, True), (DATA + 0x1000, 1024, True)])
    assert status == b.VIRTIO_BLK_S_OK and used == 1536 + 1
    assert rig.mem.read(DATA, 512) == bytes(rig.disk.data[1024:1536])
    assert rig.mem.read(DATA + 0x1000, 1024) == bytes(rig.disk.data[1536:2560])
    assert rig.disk.buffer_types == {memoryview}  # zero copy: views of guest memory
    assert rig.irqs == 1


def test_write_then_read_back():
    rig = Rig()
    rig.mem.write(DATA, b"A" * 512 + b"B" * 512)
    status, used = rig.request(b.VIRTIO_BLK_T_OUT, 5, [(DATA, 1024, False)])
    assert (status, used) == (b.VIRTIO_BLK_S_OK, 1)
    assert rig.disk.data[5 * 512:7 * 512] == b"A" * 512 + b"B" * 512
    status, used = rig.request(b.VIRTIO_BLK_T_IN, 6, [(DATA + 0x2000, 512, True)])
    assert rig.mem.read(DATA + 0x2000, 512) == b"B" * 512


def test_header_split_across_descriptors():
    rig = Rig()
    rig.mem.write(HDR, struct.pack("<IIQ", b.VIRTIO_BLK_T_IN, 0, 1))
    rig.mem.write(STATUS, b"\xff")
    head = rig.q.add_chain([(HDR, 4, False), (HDR + 4, 12, False), (DATA, 512, True), (STATUS, 1, True)])
    rig.drv.notify(0)
    assert rig.q.take_used() == [(head, 513)]
    assert rig.mem.read(DATA, 512) == bytes(rig.disk.data[512:1024])
    assert rig.mem.read(STATUS, 1) == b"\0"


def test_status_byte_sharing_the_last_data_descriptor():
    rig = Rig()
    rig.mem.write(HDR, struct.pack("<IIQ", b.VIRTIO_BLK_T_IN, 0, 0))
    head = rig.q.add_chain([(HDR, 16, False), (DATA, 513, True)])
    rig.drv.notify(0)
    assert rig.q.take_used() == [(head, 513)]
    assert rig.mem.read(DATA, 512) == bytes(rig.disk.data[:512])
    assert rig.mem.read(DATA + 512, 1) == b"\0"


def test_flush():
    rig = Rig()
    assert rig.request(b.VIRTIO_BLK_T_FLUSH, 0, []) == (b.VIRTIO_BLK_S_OK, 1)
    assert rig.disk.flushes == 1


def test_get_id():
    rig = Rig(serial="sn1")
    status, used = rig.request(b.VIRTIO_BLK_T_GET_ID, 0, [(DATA, 20, True)])
    assert (status, used) == (b.VIRTIO_BLK_S_OK, 21)
    assert rig.mem.read(DATA, 20) == b"sn1" + bytes(17)
    rig = Rig(serial="x" * 30)
    rig.request(b.VIRTIO_BLK_T_GET_ID, 0, [(DATA, 20, True)])
    assert rig.mem.read(DATA, 20) == b"x" * 20


def test_read_only_device_refuses_writes_without_touching_the_disk():
    rig = Rig(readonly=True)
    assert rig.drv.device_features() & b.VIRTIO_BLK_F_RO
    before = bytes(rig.disk.data)
    rig.mem.write(DATA, b"Z" * 512)
    assert rig.request(b.VIRTIO_BLK_T_OUT, 0, [(DATA, 512, False)]) == (b.VIRTIO_BLK_S_IOERR, 1)
    assert bytes(rig.disk.data) == before
    assert rig.request(b.VIRTIO_BLK_T_IN, 0, [(DATA, 512, True)])[0] == b.VIRTIO_BLK_S_OK


@pytest.mark.parametrize("rtype, sector, bufs", [
    (b.VIRTIO_BLK_T_IN, DISK // 512, [(DATA, 512, True)]),
    (b.VIRTIO_BLK_T_IN, DISK // 512 - 1, [(DATA, 1024, True)]),
    (b.VIRTIO_BLK_T_OUT, (1 << 64) - 1, [(DATA, 512, False)]),
    (b.VIRTIO_BLK_T_IN, 0, [(DATA, 100, True)]),  # not a whole sector
])
def test_out_of_range_or_partial_sector_is_ioerr(rtype, sector, bufs):
    rig = Rig()
    before = bytes(rig.disk.data)
    assert rig.request(rtype, sector, bufs) == (b.VIRTIO_BLK_S_IOERR, 1)
    assert bytes(rig.disk.data) == before


def test_unsupported_type():
    rig = Rig()
    assert rig.request(11, 0, []) == (b.VIRTIO_BLK_S_UNSUPP, 1)  # DISCARD not offered


def test_backend_errors_become_ioerr():
    rig = Rig()
    rig.disk.fail = True
    assert rig.request(b.VIRTIO_BLK_T_IN, 0, [(DATA, 512, True)]) == (b.VIRTIO_BLK_S_IOERR, 1)
    assert rig.request(b.VIRTIO_BLK_T_OUT, 0, [(DATA, 512, False)]) == (b.VIRTIO_BLK_S_IOERR, 1)


def test_malformed_requests_complete_without_breaking_the_queue():
    rig = Rig()
    # header too short
    rig.mem.write(STATUS, b"\xff")
    h1 = rig.q.add_chain([(HDR, 8, False), (STATUS, 1, True)])
    # no writable descriptor at all: nowhere to put the status
    h2 = rig.q.add_chain([(HDR, 16, False)])
    # readable after writable
    h3 = rig.q.add_chain([(HDR, 16, False), (DATA, 512, True), (DATA + 0x1000, 512, False)])
    rig.drv.notify(0)
    assert rig.q.take_used() == [(h1, 1), (h2, 0), (h3, 0)]
    assert rig.mem.read(STATUS, 1)[0] == b.VIRTIO_BLK_S_IOERR
    assert not rig.drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET
    assert rig.request(b.VIRTIO_BLK_T_FLUSH, 0, [])[0] == b.VIRTIO_BLK_S_OK


def test_hostile_chain_sets_needs_reset():
    rig = Rig()
    rig.q.add_chain([(RAM - 8, 16, True)])
    rig.drv.notify(0)
    assert rig.drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET
    assert rig.drv.read32(r.INTERRUPT_STATUS) & r.INT_CONFIG


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(desc=st.binary(min_size=16 * 8, max_size=16 * 8),
       ring=st.lists(st.integers(0, 9), min_size=8, max_size=8),
       avail_idx=st.integers(0, 10),
       header=st.binary(min_size=16, max_size=16))
def test_fuzz_block_requests(desc, ring, avail_idx, header):
    dev, drv, q = notify_fuzzed_queue(MemDisk(), desc, ring, avail_idx, header)  # must never raise
    status = drv.read32(r.STATUS)
    if dev.broken:
        assert status & r.DEVICE_NEEDS_RESET
    else:
        assert q.used_idx() == avail_idx


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rtype=st.sampled_from([b.VIRTIO_BLK_T_IN, b.VIRTIO_BLK_T_OUT, b.VIRTIO_BLK_T_FLUSH, b.VIRTIO_BLK_T_GET_ID, 77]),
       data_writable=st.booleans(), readonly=st.booleans(),
       sector=st.sampled_from([0, 3, DISK // 512 - 2, DISK // 512, 1 << 40]),
       length=st.sampled_from([512, 1024, 100, 2048]))
def test_header_data_status_requests_answer_as_the_general_path_does(rtype, data_writable, readonly, sector, length):
    # The usual three-descriptor shape has a short path in _parse; the same request with its
    # data split over two descriptors takes the general one. Same status, used length, disk.
    outcomes = []
    for split in (False, True):
        rig = BlockRig(MemDisk(readonly=readonly), poll_max=0)
        hdr, data, status = 0x8000, 0x10000, 0x9000
        rig.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        rig.mem.write(data, bytes(range(256)) * (length // 256) + bytes(length % 256))
        rig.mem.write(status, b"\xff")
        if split:
            half = length // 2
            bufs = [(data, half, data_writable), (data + half, length - half, data_writable)]
        else:
            bufs = [(data, length, data_writable)]
        rig.q.add_chain([(hdr, 16, False), *bufs, (status, 1, True)])
        rig.drv.notify(0)
        outcomes.append((rig.q.take_used()[0][1], rig.mem.read(status, 1), rig.mem.read(data, length),
                         bytes(rig.disk.data)))
    assert outcomes[0] == outcomes[1]
