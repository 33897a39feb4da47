import pytest

from domain.devices.bus import Bus
from domain.devices.virtio import mmio as r
from domain.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from domain.devices.virtio.mock import MmioDriver, MockQueue
from domain.devices.virtio.mmio import VirtioMmioTransport
from domain.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from domain.errors import SnapshotFormatError
from domain.memory import GuestMemory
from tests.unit.virtio_echo import EchoDevice

RAM = 0x40000
DATA = 0x20000


class Rig:
    def __init__(self):
        self.mem = GuestMemory([(0, bytearray(RAM))])
        self.dev = EchoDevice(self.mem)
        self.irqs = 0
        self.activated = []
        self.t = VirtioMmioTransport(self.dev, self.trigger, on_activate=self.activated.append)
        self.drv = MmioDriver(self.t)
        self.q0 = MockQueue(self.mem, 16, 0x1000)
        self.q1 = MockQueue(self.mem, 16, 0x3000)

    def trigger(self):
        self.irqs += 1

    def start(self, features=None):
        return self.drv.start([self.q0, self.q1], features)


def test_identification_registers():
    rig = Rig()
    d = rig.drv
    assert d.read32(r.MAGIC_VALUE) == 0x74726976
    assert d.read32(r.VERSION) == 2
    assert d.read32(r.DEVICE_ID) == 42
    assert d.read32(r.VENDOR_ID) == r.VENDOR
    feats = d.device_features()
    assert feats & VIRTIO_F_VERSION_1 and feats & EchoDevice.FEATURE_X and feats & VIRTIO_RING_F_EVENT_IDX
    d.write32(r.QUEUE_SEL, 0)
    assert d.read32(r.QUEUE_NUM_MAX) == 16
    d.write32(r.QUEUE_SEL, 2)
    assert d.read32(r.QUEUE_NUM_MAX) == 0  # no such queue
    assert d.read_config(0, 8) == b"CONFIG!!"
    assert d.read_config(6, 4) == b"!!\0\0"  # past the end reads zero


def test_probe_to_driver_ok_and_queue_traffic():
    rig = Rig()
    status = rig.start()
    assert status == r.ACKNOWLEDGE | r.DRIVER | r.FEATURES_OK | r.DRIVER_OK
    assert rig.dev.activated and rig.dev.activations == 1 and rig.activated == [rig.t]
    assert rig.dev.acked_features == rig.drv.device_features()
    assert rig.dev.queues[1].event_idx
    head = rig.q1.add_chain([(DATA, 8, False), (DATA + 64, 32, True)])
    rig.drv.notify(1)
    assert rig.dev.handled == [(1, head)]
    assert rig.q1.take_used() == [(head, 32)]
    assert rig.irqs == 1
    assert rig.drv.ack_interrupt() == r.INT_USED_RING
    assert rig.drv.read32(r.INTERRUPT_STATUS) == 0


def test_the_ioeventfd_path_reaches_the_same_queue():
    rig = Rig()
    rig.start()
    head = rig.q0.add_chain([(DATA, 4, True)])
    rig.dev.process_queue(0)
    assert rig.q0.take_used() == [(head, 4)]
    rig.dev.process_queue(7)  # unknown queue: ignored


def test_features_ok_refused_without_version_1_or_with_unknown_bits():
    rig = Rig()
    assert not rig.drv.negotiate(EchoDevice.FEATURE_X)  # legacy-only driver
    assert not rig.drv.read32(r.STATUS) & r.FEATURES_OK
    assert not rig.drv.negotiate(VIRTIO_F_VERSION_1 | (1 << 50))
    assert rig.drv.negotiate(VIRTIO_F_VERSION_1)
    assert rig.dev.acked_features == VIRTIO_F_VERSION_1


def test_status_out_of_order_is_ignored():
    rig = Rig()
    d = rig.drv
    d.write32(r.STATUS, r.ACKNOWLEDGE | r.DRIVER | r.FEATURES_OK | r.DRIVER_OK)
    assert d.read32(r.STATUS) == 0
    d.write32(r.STATUS, r.ACKNOWLEDGE)
    d.write32(r.STATUS, r.ACKNOWLEDGE | r.DRIVER_OK)
    assert d.read32(r.STATUS) == r.ACKNOWLEDGE
    assert not rig.dev.activated


def test_queue_registers_only_between_features_ok_and_driver_ok():
    rig = Rig()
    d = rig.drv
    d.write32(r.QUEUE_SEL, 0)
    d.write32(r.QUEUE_NUM, 8)  # before FEATURES_OK: ignored
    assert rig.dev.queues[0].size == 16
    rig.start()
    d.write32(r.QUEUE_SEL, 0)
    d.write32(r.QUEUE_DESC_LOW, 0x5000)  # after DRIVER_OK: ignored
    assert rig.dev.queues[0].desc_addr == rig.q0.desc_addr
    assert d.read32(r.QUEUE_READY) == 1


def test_feature_writes_only_while_negotiating():
    rig = Rig()
    rig.start()
    rig.drv.write32(r.DRIVER_FEATURES_SEL, 0)
    rig.drv.write32(r.DRIVER_FEATURES, 0)
    assert rig.t.driver_features & VIRTIO_F_VERSION_1


def test_bad_queue_config_at_driver_ok_sets_needs_reset():
    rig = Rig()
    rig.drv.negotiate()
    rig.drv.setup_queue(0, rig.q0)
    rig.drv.write32(r.QUEUE_SEL, 1)
    rig.drv.write32(r.QUEUE_NUM, 16)
    rig.drv.write32(r.QUEUE_DESC_LOW, 0)
    rig.drv.write32(r.QUEUE_DESC_HIGH, 0x100)  # far outside RAM
    rig.drv.write32(r.QUEUE_READY, 1)
    status = rig.drv.add_status(r.DRIVER_OK)
    assert status & r.DEVICE_NEEDS_RESET
    assert rig.drv.read32(r.INTERRUPT_STATUS) & r.INT_CONFIG
    assert rig.irqs == 1
    assert not rig.dev.activated and rig.activated == []


def test_hostile_chain_sets_needs_reset_and_stops_processing():
    rig = Rig()
    rig.start()
    rig.q0.write_desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 0)  # self loop
    rig.q0.publish(0)
    rig.drv.notify(0)
    assert rig.drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET
    assert rig.drv.ack_interrupt() == r.INT_CONFIG
    assert "loop" in rig.t.needs_reset_reason
    rig.q1.add_chain([(DATA, 4, True)])
    rig.drv.notify(1)
    rig.dev.process_queue(1)
    assert rig.q1.take_used() == []  # the device stays quiet until reset
    # The driver resets and starts over with fresh rings: everything works again.
    rig.q0, rig.q1 = MockQueue(rig.mem, 16, 0x1000), MockQueue(rig.mem, 16, 0x3000)
    assert rig.start() & r.DRIVER_OK
    assert not rig.drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET
    head = rig.q1.add_chain([(DATA, 4, True)])
    rig.drv.notify(1)
    assert rig.q1.take_used() == [(head, 4)]


def test_reset_on_status_zero():
    rig = Rig()
    rig.start()
    resets = rig.dev.resets
    rig.drv.write32(r.STATUS, 0)
    assert rig.drv.read32(r.STATUS) == 0
    assert not rig.dev.activated and rig.dev.resets == resets + 1
    assert rig.dev.acked_features == 0
    assert not rig.dev.queues[0].ready and not rig.dev.queues[0].active


def test_non_32bit_register_access_is_ignored():
    rig = Rig()
    buf = bytearray(2)
    rig.t.read(r.MAGIC_VALUE, memoryview(buf))
    assert buf == b"\0\0"
    rig.t.write(r.STATUS, memoryview(b"\x01\x00"))
    assert rig.drv.read32(r.STATUS) == 0
    rig.t.read(r.MAGIC_VALUE + 2, memoryview(bytearray(4)))


def test_config_space_writes_and_generation():
    rig = Rig()
    rig.start()
    rig.drv.write_config(0, b"cf")
    assert rig.drv.read_config(0, 2) == b"cf"
    gen = rig.drv.read32(r.CONFIG_GENERATION)
    rig.t.config_changed()
    assert rig.drv.read32(r.CONFIG_GENERATION) == gen + 1
    assert rig.drv.read32(r.INTERRUPT_STATUS) & r.INT_CONFIG


def test_failed_bit():
    rig = Rig()
    rig.drv.add_status(r.ACKNOWLEDGE)
    rig.drv.add_status(r.FAILED)
    assert rig.drv.read32(r.STATUS) & r.FAILED


def test_empty_slot_reads_device_id_zero():
    t = VirtioMmioTransport(None, lambda: None)
    d = MmioDriver(t)
    assert d.read32(r.MAGIC_VALUE) == 0x74726976 and d.read32(r.DEVICE_ID) == 0
    d.write32(r.STATUS, 1)
    assert d.read32(r.STATUS) == 0
    rig = Rig()
    t.set_device(rig.dev)
    assert d.read32(r.DEVICE_ID) == 42
    t.set_device(None)
    assert d.read32(r.DEVICE_ID) == 0


def test_bus_uses_the_transport_lock():
    rig = Rig()
    bus = Bus("mmio")
    bus.insert(rig.t, 0xD0000000, 0x1000)
    buf = bytearray(4)
    assert bus.read(0xD0000000 + r.DEVICE_ID, memoryview(buf))
    assert buf == (42).to_bytes(4, "little")
    assert bus.find(0xD0000000)[0].lock is rig.t.lock is rig.dev.lock


def test_snapshot_round_trip_continues_the_queues():
    rig = Rig()
    rig.start()
    rig.q0.add_chain([(DATA, 4, True)])
    rig.drv.notify(0)
    state = rig.t.save_state()
    # Same memory, new device + transport: as after a restore.
    dev2 = EchoDevice(rig.mem)
    activated = []
    t2 = VirtioMmioTransport(dev2, lambda: None, on_activate=activated.append)
    t2.restore_state(state)
    assert dev2.activated and activated == [t2]
    assert MmioDriver(t2).read32(r.STATUS) & r.DRIVER_OK
    head = rig.q0.add_chain([(DATA, 8, True)])
    dev2.process_queue(0)
    assert rig.q0.take_used() == [(0, 4), (head, 8)]


def test_snapshot_restore_refuses_garbage():
    rig = Rig()
    rig.start()
    state = rig.t.save_state()
    bad_dev = {**state, "device": {**state["device"], "device_id": 1}}
    for bad in ({}, {**state, "status": 999}, bad_dev, {**state, "device": None}):
        with pytest.raises(SnapshotFormatError):
            VirtioMmioTransport(EchoDevice(rig.mem), lambda: None).restore_state(bad)
