"""virtio-pci (modern) driven like Linux's virtio_pci_modern: capabilities, common configuration,
queues, notifications, MSI-X delivery and masking, the PCI_CFG window, reset and snapshots."""

import struct

import pytest

from domain.devices.pci import regs
from domain.devices.pci import virtio_pci as vp
from domain.devices.pci.host import devfn
from domain.devices.pci.mock import PciRig, VirtioPciDriver
from domain.devices.pci.virtio_pci import VirtioPciTransport
from domain.devices.virtio.device import VIRTIO_F_VERSION_1
from domain.devices.virtio.mmio import DEVICE_NEEDS_RESET, DRIVER_OK, FEATURES_OK
from domain.devices.virtio.mock import MockQueue
from domain.errors import SnapshotFormatError
from domain.memory import GuestMemory
from tests.unit.virtio_echo import EchoDevice

RAM = 0x40000
DATA = 0x20000
SLOT = devfn(4)
BAR_ADDR = 0xC000_8000
LAPIC = 0xFEE0_0000


class BlockEchoDevice(EchoDevice):
    device_id = 2  # presents as a block device


class Setup:
    def __init__(self):
        self.rig = PciRig()
        self.mem = GuestMemory([(0, bytearray(RAM))])
        self.dev = BlockEchoDevice(self.mem)
        self.activated = []
        self.t = self.rig.wire(VirtioPciTransport(self.dev, self.rig.send_msi, name="vblk",
                                                  on_activate=self.activated.append))
        self.rig.root.bus.attach(SLOT, self.t)
        self.q0 = MockQueue(self.mem, 16, 0x1000)
        self.q1 = MockQueue(self.mem, 16, 0x3000)

    def driver(self, msix=True):
        drv = VirtioPciDriver(self.rig, 0, SLOT, bar_address=BAR_ADDR)
        if msix:
            drv.enable_msix([(LAPIC, 0x40 + v) for v in range(3)])
        return drv


@pytest.fixture
def s():
    return Setup()


def test_identity_header_and_bar(s):
    c = s.rig.conf1()
    assert c.read(0, SLOT, regs.VENDOR_ID, 4) == 0x1042 << 16 | 0x1AF4
    assert c.read(0, SLOT, regs.REVISION_ID, 1) == 1  # modern only
    assert c.read(0, SLOT, regs.REVISION_ID, 4) >> 8 == regs.CLASS_STORAGE_SCSI
    assert c.read(0, SLOT, regs.SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert c.read(0, SLOT, regs.SUBSYSTEM_ID, 2) >= 0x40
    assert c.read(0, SLOT, regs.INTERRUPT_PIN, 1) == 0
    assert c.size_bar(0, SLOT, 0) == (vp.BAR_SIZE, 0)  # 32-bit, non-prefetchable
    assert [c.size_bar(0, SLOT, i)[0] for i in range(1, 6)] == [0] * 5


def test_capabilities_describe_the_bar(s):
    drv = s.driver(msix=False)
    c = drv.c
    assert set(drv.caps) == {vp.CAP_COMMON_CFG, vp.CAP_ISR_CFG, vp.CAP_DEVICE_CFG, vp.CAP_NOTIFY_CFG, vp.CAP_PCI_CFG}
    for cfg_type, (at, offset, length) in drv.caps.items():
        assert c.read(0, SLOT, at + 4, 1) == 0  # BAR 0
        assert c.read(0, SLOT, at + 2, 1) == (20 if cfg_type in (vp.CAP_NOTIFY_CFG, vp.CAP_PCI_CFG) else 16)
        if cfg_type != vp.CAP_PCI_CFG:
            assert offset + length <= vp.BAR_SIZE
    assert drv.caps[vp.CAP_COMMON_CFG][2] >= 0x38
    assert drv.notify_multiplier == 4
    msix = c.find(0, SLOT, regs.CAP_ID_MSIX)
    assert c.read(0, SLOT, msix + regs.MSIX_FLAGS, 2) & regs.MSIX_FLAGS_QSIZE == 2  # 3 vectors
    assert c.read(0, SLOT, msix + regs.MSIX_TABLE, 4) == vp.MSIX_TABLE_OFFSET
    assert c.read(0, SLOT, msix + regs.MSIX_PBA, 4) == vp.MSIX_PBA_OFFSET


def test_bring_up_notify_and_msix_interrupt(s):
    drv = s.driver()
    assert drv.common_read(vp.NUM_QUEUES, 2) == 2
    feats = drv.device_features()
    assert feats & VIRTIO_F_VERSION_1 and feats & EchoDevice.FEATURE_X
    assert drv.start([s.q0, s.q1]) & DRIVER_OK
    assert s.dev.activated and s.activated == [s.t]
    assert s.dev.acked_features == feats
    head = s.q1.add_chain([(DATA, 8, False), (DATA + 64, 32, True)])
    drv.notify(1)
    assert s.dev.handled == [(1, head)] and s.q1.take_used() == [(head, 32)]
    assert s.rig.msis == [(LAPIC, 0x42)]  # queue 1 was given vector 2
    assert drv.isr() == 1 and drv.isr() == 0  # reading ISR clears it
    assert s.t.notify_addresses() == [vp.NOTIFY_OFFSET, vp.NOTIFY_OFFSET + 4]
    assert drv.notify_address(1) == BAR_ADDR + vp.NOTIFY_OFFSET + 4


def test_device_config_through_the_bar(s):
    drv = s.driver()
    assert drv.read_device_config(0, 4) == int.from_bytes(b"CONF", "little")
    s.rig.mmio_write(drv._addr(vp.CAP_DEVICE_CFG, 0), 1, ord("X"))  # before DRIVER: ignored
    assert s.dev.config[0] == ord("C")
    drv.negotiate()
    s.rig.mmio_write(drv._addr(vp.CAP_DEVICE_CFG, 0), 1, ord("X"))
    assert s.dev.config[0] == ord("X")


def test_features_without_version_1_are_refused(s):
    drv = s.driver()
    assert not drv.negotiate(EchoDevice.FEATURE_X)
    assert not drv.status() & FEATURES_OK
    assert not drv.negotiate(VIRTIO_F_VERSION_1 | 1 << 50)
    assert drv.negotiate(VIRTIO_F_VERSION_1)


def test_queue_registers(s):
    drv = s.driver()
    drv.common_write(vp.Q_SELECT, 2, 1)
    assert drv.common_read(vp.Q_SIZE, 2) == 16  # the maximum until the driver shrinks it
    assert drv.common_read(vp.Q_NOFF, 2) == 1
    assert drv.common_read(vp.Q_MSIX, 2) == vp.NO_VECTOR
    drv.common_write(vp.Q_SIZE, 2, 8)  # before FEATURES_OK: ignored
    assert drv.common_read(vp.Q_SIZE, 2) == 16
    drv.negotiate()
    drv.common_write(vp.Q_SELECT, 2, 1)
    drv.common_write(vp.Q_SIZE, 2, 8)
    drv.common_write(vp.Q_DESCLO, 4, 0x1000)
    drv.common_write(vp.Q_DESCHI, 4, 0x1)
    assert drv.common_read(vp.Q_DESCLO, 4) == 0x1000 and drv.common_read(vp.Q_DESCHI, 4) == 1
    assert s.dev.queues[1].desc_addr == 0x1_0000_1000
    s.rig.mmio_write(drv._addr(vp.CAP_COMMON_CFG, vp.Q_USEDLO), 8, 0x2_0000_3000)  # one 64-bit write
    assert s.dev.queues[1].used_addr == 0x2_0000_3000
    drv.common_write(vp.Q_ENABLE, 2, 1)
    assert drv.common_read(vp.Q_ENABLE, 2) == 1
    drv.common_write(vp.Q_SIZE, 2, 4)  # an enabled queue is frozen
    drv.common_write(vp.Q_ENABLE, 2, 0)
    assert drv.common_read(vp.Q_SIZE, 2) == 8 and drv.common_read(vp.Q_ENABLE, 2) == 1
    drv.common_write(vp.Q_SELECT, 2, 7)  # no such queue
    assert drv.common_read(vp.Q_SIZE, 2) == 0 and drv.common_read(vp.Q_MSIX, 2) == vp.NO_VECTOR
    drv.common_write(vp.Q_MSIX, 2, 1)
    assert drv.common_read(vp.Q_MSIX, 2) == vp.NO_VECTOR
    assert drv.common_read(vp.Q_SELECT, 2) == 7
    assert drv.common_read(vp.DF + 1, 2) == 0  # not a field: reads 0


def test_vectors_beyond_the_table_are_refused(s):
    drv = s.driver()
    drv.negotiate()
    drv.common_write(vp.MSIX_CONFIG, 2, 3)
    assert drv.common_read(vp.MSIX_CONFIG, 2) == vp.NO_VECTOR
    assert drv.setup_queue(0, s.q0, 2) == 2
    assert drv.setup_queue(0, s.q0, 9) == vp.NO_VECTOR


def test_config_change_uses_the_config_vector_and_generation(s):
    drv = s.driver()
    drv.start([s.q0, s.q1], config_vector=0)
    gen = drv.common_read(vp.CONFIG_GENERATION, 1)
    s.dev.interrupt.config_changed()
    assert drv.common_read(vp.CONFIG_GENERATION, 1) == (gen + 1) & 0xFF
    assert s.rig.msis == [(LAPIC, 0x40)]
    assert drv.isr() == 2


def test_msix_entry_mask_holds_the_message_in_the_pba(s):
    drv = s.driver()
    drv.start([s.q0, s.q1])
    table = drv.msix_table_address()
    s.rig.mmio_write(table + 16 * 1 + 12, 4, 1)  # mask vector 1 (queue 0)
    head = s.q0.add_chain([(DATA, 4, True)])
    drv.notify(0)
    assert s.q0.take_used() == [(head, 4)] and s.rig.msis == []
    pba = drv.base + vp.MSIX_PBA_OFFSET
    assert s.rig.mmio_read(pba, 8) == 0b10
    s.rig.mmio_write(table + 16 * 1 + 12, 4, 0)
    assert s.rig.msis == [(LAPIC, 0x41)] and s.rig.mmio_read(pba, 8) == 0


def test_function_mask_and_disabled_msix(s):
    drv = s.driver()
    drv.start([s.q0, s.q1])
    c, msix = drv.c, drv.msix
    ctl = c.read(0, SLOT, msix + regs.MSIX_FLAGS, 2)
    c.write(0, SLOT, msix + regs.MSIX_FLAGS, 2, ctl | regs.MSIX_FLAGS_MASKALL)
    s.q1.add_chain([(DATA, 4, True)])
    drv.notify(1)
    assert s.rig.msis == []
    c.write(0, SLOT, msix + regs.MSIX_FLAGS, 2, ctl)
    assert s.rig.msis == [(LAPIC, 0x42)]
    c.write(0, SLOT, msix + regs.MSIX_FLAGS, 2, 0)  # MSI-X off: no INTx either
    s.q1.add_chain([(DATA, 4, True)])
    drv.notify(1)
    assert s.rig.msis == [(LAPIC, 0x42)] and drv.isr() == 1


def test_msix_table_access_rules(s):
    drv = s.driver(msix=False)
    table = drv.msix_table_address()
    assert s.rig.mmio_read(table + 12, 4) == 1  # every vector starts masked
    s.rig.mmio_write(table, 8, 0x1_FEE0_0003)  # qword write; address bits 1:0 are reserved
    assert s.rig.mmio_read(table, 8) == 0x1_FEE0_0000
    s.rig.mmio_write(table + 12, 4, 0xFFFF_FFFF)
    assert s.rig.mmio_read(table + 12, 4) == 1
    s.rig.mmio_write(table + 2, 2, 0xFFFF)  # not a dword or qword: ignored
    assert s.rig.mmio_read(table, 4) == 0xFEE0_0000
    assert s.rig.mmio_read(table + 16 * 3, 4) == 0  # beyond the 3 entries


def test_reset_clears_vectors_and_queues(s):
    drv = s.driver()
    drv.start([s.q0, s.q1])
    drv.common_write(vp.DEVICE_STATUS, 1, 0)
    assert drv.status() == 0 and not s.dev.activated
    assert drv.common_read(vp.MSIX_CONFIG, 2) == vp.NO_VECTOR
    drv.common_write(vp.Q_SELECT, 2, 0)
    assert drv.common_read(vp.Q_ENABLE, 2) == 0 and drv.common_read(vp.Q_MSIX, 2) == vp.NO_VECTOR


def test_bad_ring_sets_needs_reset_and_interrupts(s):
    drv = s.driver()
    drv.negotiate()
    drv.common_write(vp.MSIX_CONFIG, 2, 0)
    drv.common_write(vp.Q_SELECT, 2, 0)
    drv.common_write(vp.Q_DESCLO, 4, RAM * 4)  # outside guest RAM
    drv.common_write(vp.Q_ENABLE, 2, 1)
    drv.add_status(DRIVER_OK)
    assert drv.status() & DEVICE_NEEDS_RESET
    assert s.rig.msis == [(LAPIC, 0x40)]
    drv.notify(0)  # a broken device ignores notifies
    assert s.dev.handled == []


def test_pci_cfg_window_reaches_the_bar(s):
    drv = s.driver()
    c = drv.c
    at = drv.caps[vp.CAP_PCI_CFG][0]
    c.write(0, SLOT, at + 4, 1, 0)
    c.write(0, SLOT, at + 8, 4, vp.COMMON_OFFSET + vp.NUM_QUEUES)
    c.write(0, SLOT, at + 12, 4, 2)
    assert c.read(0, SLOT, at + 16, 4) & 0xFFFF == 2
    c.write(0, SLOT, at + 8, 4, vp.COMMON_OFFSET + vp.DEVICE_STATUS)
    c.write(0, SLOT, at + 12, 4, 1)
    c.write(0, SLOT, at + 16, 1, 1)  # ACKNOWLEDGE through configuration space
    assert drv.status() == 1
    c.write(0, SLOT, at + 12, 4, 3)  # bad length: nothing happens
    c.write(0, SLOT, at + 16, 4, 0)
    assert drv.status() == 1


def test_moving_the_bar_moves_the_registers(s):
    drv = s.driver()
    c = drv.c
    c.write(0, SLOT, regs.BAR0, 4, 0xC010_0000)
    assert s.rig.mmio_read(BAR_ADDR + vp.NUM_QUEUES, 2) == 0xFFFF
    assert s.rig.mmio_read(0xC010_0000 + vp.NUM_QUEUES, 2) == 2
    assert s.rig.moves[-1] == ("vblk", 0, BAR_ADDR, 0xC010_0000)
    s.t.release()
    assert s.rig.mmio.devices() == []


def test_snapshot_round_trip(s):
    drv = s.driver()
    drv.start([s.q0, s.q1])
    state = s.t.save_state()
    other = Setup()
    other.t.restore_state(state)
    assert other.t.status == s.t.status and other.dev.activated
    assert other.t.queue_vectors == [1, 2]
    assert other.t.msix.enabled and other.t.msix.entry(2) == (LAPIC, 0x42, False)
    assert other.rig.mmio_read(BAR_ADDR + vp.NUM_QUEUES, 2) == 2  # decoding restored too
    bad = dict(state, config=b"\0" * 256)
    with pytest.raises(SnapshotFormatError):
        Setup().t.restore_state(bad)
    with pytest.raises(SnapshotFormatError):
        Setup().t.restore_state(dict(state, queue_vectors=[1]))
    assert struct.unpack_from("<H", state["config"], 0)[0] == 0x1AF4
