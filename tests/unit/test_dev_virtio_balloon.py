import struct

from domain.devices.virtio import balloon as bl
from domain.devices.virtio import mmio as r
from domain.devices.virtio.balloon import VirtioBalloon
from domain.devices.virtio.mock import MmioDriver, MockQueue
from domain.devices.virtio.mmio import VirtioMmioTransport
from domain.memory import GuestMemory

RAM = 0x100000  # 1 MiB = 256 balloon pages
PFNS = 0x80000


class Rig:
    def __init__(self, stats=False, deflate_on_oom=False):
        self.mem = GuestMemory([(0, bytearray(RAM))])
        self.discarded, self.reclaimed, self.changes = [], [], []
        self.dev = VirtioBalloon(self.mem, discard=lambda g, n: self.discarded.append((g, n)),
                                 reclaim=lambda g, n: self.reclaimed.append((g, n)),
                                 on_actual_changed=self.changes.append, stats=stats,
                                 deflate_on_oom=deflate_on_oom, queue_size=16)
        self.irqs = 0
        self.t = VirtioMmioTransport(self.dev, self.irq)
        self.drv = MmioDriver(self.t)
        self.queues = [MockQueue(self.mem, 16, 0x1000 + 0x1000 * i) for i in range(3 if stats else 2)]
        assert self.drv.start(self.queues) & r.DRIVER_OK

    def irq(self):
        self.irqs += 1

    def send_pfns(self, queue, pfns):
        self.mem.write(PFNS, struct.pack(f"<{len(pfns)}I", *pfns))
        head = self.queues[queue].add_chain([(PFNS, 4 * len(pfns), False)])
        self.drv.notify(queue)
        assert self.queues[queue].take_used() == [(head, 0)]


def test_features():
    assert not Rig().drv.device_features() & bl.VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    feats = Rig(stats=True, deflate_on_oom=True).drv.device_features()
    assert feats & bl.VIRTIO_BALLOON_F_DEFLATE_ON_OOM and feats & bl.VIRTIO_BALLOON_F_STATS_VQ


def test_target_sets_num_pages_and_signals_config_change():
    rig = Rig()
    rig.dev.set_target_bytes(RAM - 40 * 4096)
    assert struct.unpack("<II", rig.drv.read_config(0, 8)) == (40, 0)
    assert rig.drv.ack_interrupt() & r.INT_CONFIG
    assert rig.dev.target_bytes() == RAM - 40 * 4096
    rig.dev.set_target_bytes(10 * RAM)  # above RAM: balloon empty
    assert rig.dev.num_pages == 0
    rig.dev.set_target_bytes(-5)  # below zero: everything
    assert rig.dev.num_pages == RAM // 4096


def test_inflate_discards_coalesced_ranges_and_deflate_reclaims():
    rig = Rig()
    rig.send_pfns(bl.INFLATE_QUEUE, [10, 11, 12, 20, 13])
    assert rig.discarded == [(10 * 4096, 3 * 4096), (20 * 4096, 4096), (13 * 4096, 4096)]
    assert rig.dev.inflated_pages == 5
    rig.send_pfns(bl.DEFLATE_QUEUE, [10, 11])
    assert rig.reclaimed == [(10 * 4096, 2 * 4096)]
    assert rig.dev.deflated_pages == 2


def test_pfns_outside_ram_are_ignored_and_counted():
    rig = Rig()
    rig.send_pfns(bl.INFLATE_QUEUE, [RAM // 4096, 0xFFFFFFFF, 3])
    assert rig.discarded == [(3 * 4096, 4096)]
    assert rig.dev.invalid_pfns == 2


def test_actual_written_by_the_guest_is_reported():
    rig = Rig()
    rig.dev.set_target_bytes(RAM - 16 * 4096)
    rig.drv.write_config(4, struct.pack("<I", 16))
    assert rig.dev.actual == 16
    assert rig.dev.balloon_bytes() == 16 * 4096
    assert rig.dev.actual_bytes() == RAM - 16 * 4096
    assert rig.changes == [RAM - 16 * 4096]
    rig.drv.write_config(4, struct.pack("<I", 16))  # unchanged: no event
    assert len(rig.changes) == 1
    rig.drv.write_config(0, struct.pack("<I", 999))  # num_pages is not the driver's to write
    assert rig.dev.num_pages == 16


def test_stats_buffer_is_kept_and_returned_on_request():
    rig = Rig(stats=True)
    q = rig.queues[bl.STATS_QUEUE]
    rig.mem.write(PFNS, struct.pack("<HQ", 4, 12345) + struct.pack("<HQ", 5, 99999))
    head = q.add_chain([(PFNS, 20, False)])
    rig.drv.notify(bl.STATS_QUEUE)
    assert rig.dev.guest_stats == {"stat-free-memory": 12345, "stat-total-memory": 99999}
    assert q.take_used() == []  # held until the host wants fresh numbers
    assert rig.dev.request_stats()
    assert q.take_used() == [(head, 0)]
    assert not rig.dev.request_stats()


def test_state_round_trip():
    rig = Rig()
    rig.dev.set_target_bytes(RAM - 8 * 4096)
    rig.drv.write_config(4, struct.pack("<I", 8))
    state = rig.t.save_state()
    dev2 = VirtioBalloon(rig.mem, discard=lambda g, n: None, queue_size=16)
    VirtioMmioTransport(dev2, lambda: None).restore_state(state)
    assert (dev2.num_pages, dev2.actual, dev2.activated) == (8, 8, True)
