"""pcie-root-port and its hot-plug slot, driven the way Linux's portdrv and pciehp drive it
(drivers/pci/hotplug/pciehp_hpc.c, pciehp_ctrl.c), through 0xCF8/0xCFC."""

import pytest

from domain.devices.pci import regs
from domain.devices.pci.device import PciDevice
from domain.devices.pci.host import devfn
from domain.devices.pci.mock import PciRig
from domain.devices.pci.root_port import PcieRootPort
from domain.errors import DeviceNotFoundError, DuplicateIdError

PORT = devfn(2)
MSI_ADDR, MSI_DATA = 0xFEE0_0000, 0x4025


def endpoint():
    return PciDevice(vendor=0x1AF4, device=0x1042, class_code=regs.CLASS_STORAGE_SCSI, name="disk")


class Pciehp:
    """The guest driver's side of one port."""

    def __init__(self, rig, port):
        self.rig, self.port = rig, port
        self.c = rig.conf1()
        self.exp = self.c.find(0, PORT, regs.CAP_ID_EXP)
        self.msi = self.c.find(0, PORT, regs.CAP_ID_MSI)

    def rd(self, reg, size=2):
        return self.c.read(0, PORT, self.exp + reg, size)

    def wr(self, reg, value, size=2):
        self.c.write(0, PORT, self.exp + reg, size, value)

    def write_cmd(self, cmd, mask):
        ctl = self.rd(regs.EXP_SLTCTL)
        self.wr(regs.EXP_SLTCTL, (ctl & ~mask) | (cmd & mask))

    def enable_msi(self):
        m = self.msi
        self.c.write(0, PORT, m + regs.MSI_ADDRESS_LO, 4, MSI_ADDR)
        self.c.write(0, PORT, m + regs.MSI_ADDRESS_HI, 4, 0)
        self.c.write(0, PORT, m + regs.MSI_DATA_64, 2, MSI_DATA)
        flags = self.c.read(0, PORT, m + regs.MSI_FLAGS, 2)
        self.c.write(0, PORT, m + regs.MSI_FLAGS, 2, flags | regs.MSI_FLAGS_ENABLE)

    def probe(self):
        """pcie_init + pcie_init_notification."""
        self.wr(regs.EXP_SLTSTA, regs.SLTSTA_W1C)
        present = self.rd(regs.EXP_SLTSTA) & regs.SLTSTA_PDS or self.rd(regs.EXP_LNKSTA) & regs.EXP_LNKSTA_DLLLA
        if not present and not self.rd(regs.EXP_SLTCTL) & regs.SLTCTL_PCC:
            self.write_cmd(regs.SLTCTL_PCC, regs.SLTCTL_PCC)
        self.enable_msi()
        self.write_cmd(regs.SLTCTL_DLLSCE | regs.SLTCTL_ABPE | regs.SLTCTL_HPIE | regs.SLTCTL_CCIE,
                       regs.SLTCTL_PDCE | regs.SLTCTL_ABPE | regs.SLTCTL_PFDE | regs.SLTCTL_HPIE
                       | regs.SLTCTL_CCIE | regs.SLTCTL_DLLSCE)

    def isr(self):
        """pciehp_isr in MSI mode: read, clear what was set, re-read until nothing is left."""
        events = 0
        while True:
            st = self.rd(regs.EXP_SLTSTA) & (regs.SLTSTA_ABP | regs.SLTSTA_PFD | regs.SLTSTA_PDC
                                             | regs.SLTSTA_CC | regs.SLTSTA_DLLSC)
            if not st:
                return events
            events |= st
            self.wr(regs.EXP_SLTSTA, st)

    def board_added(self):
        self.write_cmd(0, regs.SLTCTL_PCC)  # pciehp_power_on_slot
        self.write_cmd(regs.SLTCTL_PWR_IND_BLINK, regs.SLTCTL_PIC)
        assert self.rd(regs.EXP_LNKSTA) & regs.EXP_LNKSTA_DLLLA
        assert self.rd(regs.EXP_LNKSTA) & 0x03F0 and not self.rd(regs.EXP_LNKSTA) & regs.EXP_LNKSTA_LT
        found = self.c.read(self.port.secondary_number, 0, regs.VENDOR_ID, 2) != 0xFFFF
        self.write_cmd(regs.SLTCTL_PWR_IND_ON | regs.SLTCTL_ATTN_IND_OFF, regs.SLTCTL_PIC | regs.SLTCTL_AIC)
        return found

    def button_then_remove_board(self):
        """pciehp_handle_button_press, then (5 s later) remove_board."""
        self.write_cmd(regs.SLTCTL_PWR_IND_BLINK | regs.SLTCTL_ATTN_IND_OFF, regs.SLTCTL_PIC | regs.SLTCTL_AIC)
        self.write_cmd(regs.SLTCTL_PCC, regs.SLTCTL_PCC)  # pciehp_power_off_slot
        before_indicator = self.port.slot_device
        self.write_cmd(regs.SLTCTL_PWR_IND_OFF, regs.SLTCTL_PIC)
        return before_indicator


@pytest.fixture
def rig():
    r = PciRig()
    r.port = PcieRootPort(port_number=5, send_msi=r.send_msi, name="pcie.1")
    r.root.bus.attach(PORT, r.port)
    r.port.set_bus_numbers(0, 1, 1)
    return r


def test_identity_and_capabilities_linux_checks(rig):
    c = rig.conf1()
    assert c.read(0, PORT, regs.VENDOR_ID, 4) == regs.DEVICE_REDHAT_ROOT_PORT << 16 | regs.VENDOR_REDHAT
    assert c.read(0, PORT, regs.REVISION_ID, 4) >> 8 == regs.CLASS_BRIDGE_PCI  # prog-if 0: portdrv binds
    assert c.read(0, PORT, regs.HEADER_TYPE, 1) == 1
    assert c.read(0, PORT, regs.INTERRUPT_PIN, 1) == 0
    h = Pciehp(rig, rig.port)
    flags = h.rd(regs.EXP_FLAGS)
    assert flags & 0xF == 2 and (flags >> 4) & 0xF == regs.EXP_TYPE_ROOT_PORT and flags & regs.EXP_FLAGS_SLOT
    assert (flags >> 9) & 0x1F == 0  # interrupt message number 0: the MSI vector
    sltcap = h.rd(regs.EXP_SLTCAP, 4)
    for bit in (regs.SLTCAP_ABP, regs.SLTCAP_PCP, regs.SLTCAP_AIP, regs.SLTCAP_PIP, regs.SLTCAP_HPC, regs.SLTCAP_NCCS):
        assert sltcap & bit
    assert not sltcap & (regs.SLTCAP_MRLSP | regs.SLTCAP_HPS)
    assert sltcap >> regs.SLTCAP_PSN_SHIFT == 5
    lnkcap = h.rd(regs.EXP_LNKCAP, 4)
    assert lnkcap & regs.EXP_LNKCAP_DLLLARC and lnkcap >> 24 == 5
    msi_flags = c.read(0, PORT, h.msi + regs.MSI_FLAGS, 2)
    assert msi_flags & regs.MSI_FLAGS_64BIT and not msi_flags & regs.MSI_FLAGS_QMASK


def test_empty_slot_starts_powered_off_and_absent(rig):
    h = Pciehp(rig, rig.port)
    assert not h.rd(regs.EXP_SLTSTA) & regs.SLTSTA_PDS
    assert not h.rd(regs.EXP_LNKSTA) & regs.EXP_LNKSTA_DLLLA
    ctl = h.rd(regs.EXP_SLTCTL)
    assert ctl & regs.SLTCTL_PCC and ctl & regs.SLTCTL_PIC == regs.SLTCTL_PWR_IND_OFF
    h.probe()
    assert rig.msis == []


def test_cold_plugged_device_is_powered_and_visible(rig):
    rig.port.plug(endpoint(), "disk", hot=False)
    h = Pciehp(rig, rig.port)
    assert h.rd(regs.EXP_SLTSTA) & regs.SLTSTA_PDS and h.rd(regs.EXP_LNKSTA) & regs.EXP_LNKSTA_DLLLA
    assert not h.rd(regs.EXP_SLTSTA) & (regs.SLTSTA_PDC | regs.SLTSTA_DLLSC)  # nothing to report
    assert rig.port.slot_powered
    assert h.c.read(1, 0, regs.DEVICE_ID, 2) == 0x1042
    h.probe()
    assert rig.msis == []
    with pytest.raises(DuplicateIdError):
        rig.port.plug(endpoint(), "other", hot=False)


def test_hot_add_interrupts_once_and_the_driver_brings_the_device_up(rig):
    h = Pciehp(rig, rig.port)
    h.probe()
    rig.port.plug(endpoint(), "disk", hot=True)
    assert rig.msis == [(MSI_ADDR, MSI_DATA)]
    assert h.c.read(1, 0, regs.VENDOR_ID, 2) == 0xFFFF  # slot still powered off: not visible
    events = h.isr()
    assert events == regs.SLTSTA_PDC | regs.SLTSTA_DLLSC
    assert h.rd(regs.EXP_SLTSTA) & regs.SLTSTA_PDS  # the state bit is not write-1-to-clear
    assert h.board_added()
    assert rig.msis == [(MSI_ADDR, MSI_DATA)]  # power and indicator writes raise nothing


def test_interrupt_needs_hpie_and_the_event_enable(rig):
    h = Pciehp(rig, rig.port)
    h.enable_msi()
    h.write_cmd(regs.SLTCTL_ABPE, regs.SLTCTL_ABPE)  # no HPIE, no DLLSCE
    rig.port.plug(endpoint(), "disk", hot=True)
    assert rig.msis == []
    h.write_cmd(regs.SLTCTL_HPIE | regs.SLTCTL_PDCE, regs.SLTCTL_HPIE | regs.SLTCTL_PDCE)
    assert rig.msis == [(MSI_ADDR, MSI_DATA)]  # enabling with an event pending interrupts


def test_no_new_message_until_the_driver_cleared_the_events(rig):
    h = Pciehp(rig, rig.port)
    h.probe()
    rig.port.plug(endpoint(), "disk", hot=True)
    assert len(rig.msis) == 1
    rig.port.request_unplug("disk", lambda: None)  # slot not powered by the guest: ejected now
    assert len(rig.msis) == 1  # PDC/DLLSC were never cleared: the condition never fell
    assert h.isr() == regs.SLTSTA_PDC | regs.SLTSTA_DLLSC
    rig.port.plug(endpoint(), "disk", hot=True)
    assert len(rig.msis) == 2


def test_attention_button_unplug_completes_on_power_and_indicator_off(rig):
    h = Pciehp(rig, rig.port)
    dev = endpoint()
    rig.port.plug(dev, "disk", hot=False)
    h.probe()
    done = []
    rig.port.request_unplug("disk", lambda: done.append("disk"))
    assert rig.msis == [(MSI_ADDR, MSI_DATA)]
    assert h.isr() == regs.SLTSTA_ABP
    assert rig.port.unplug_pending
    still_there = h.button_then_remove_board()
    assert still_there is dev and done == ["disk"]  # power off alone is not the acknowledgement
    assert rig.port.slot_device is None and not rig.port.unplug_pending
    assert not h.rd(regs.EXP_SLTSTA) & regs.SLTSTA_PDS and not h.rd(regs.EXP_LNKSTA) & regs.EXP_LNKSTA_DLLLA
    assert len(rig.msis) == 2  # presence / link change after the eject
    assert h.isr() == regs.SLTSTA_PDC | regs.SLTSTA_DLLSC
    assert h.c.read(1, 0, regs.VENDOR_ID, 2) == 0xFFFF
    rig.port.plug(endpoint(), "disk2", hot=True)  # the slot is free again
    assert len(rig.msis) == 3


def test_power_off_without_a_request_only_hides_the_device(rig):
    h = Pciehp(rig, rig.port)
    dev = endpoint()
    rig.port.plug(dev, "disk", hot=False)
    h.probe()
    h.write_cmd(regs.SLTCTL_PCC | regs.SLTCTL_PWR_IND_OFF, regs.SLTCTL_PCC | regs.SLTCTL_PIC)
    assert rig.port.slot_device is dev
    assert h.c.read(1, 0, regs.VENDOR_ID, 2) == 0xFFFF
    h.write_cmd(regs.SLTCTL_PWR_IND_ON, regs.SLTCTL_PCC | regs.SLTCTL_PIC)
    assert h.c.read(1, 0, regs.VENDOR_ID, 2) == 0x1AF4


def test_unplug_of_a_slot_the_guest_never_powered_is_immediate(rig):
    h = Pciehp(rig, rig.port)
    h.probe()
    rig.port.plug(endpoint(), "disk", hot=True)  # the guest did not handle it (yet)
    done = []
    rig.port.request_unplug("disk", lambda: done.append(1))
    assert done == [1] and rig.port.slot_device is None


def test_unplug_requests_are_checked(rig):
    with pytest.raises(DeviceNotFoundError):
        rig.port.request_unplug("disk", lambda: None)
    rig.port.plug(endpoint(), "disk", hot=False)
    with pytest.raises(DeviceNotFoundError):
        rig.port.request_unplug("other", lambda: None)
    rig.port.request_unplug("disk", lambda: None)
    with pytest.raises(DuplicateIdError):
        rig.port.request_unplug("disk", lambda: None)


def test_done_runs_through_defer_outside_the_config_access():
    r = PciRig()
    deferred = []
    port = PcieRootPort(port_number=1, send_msi=r.send_msi, defer=deferred.append, name="p")
    r.root.bus.attach(PORT, port)
    port.set_bus_numbers(0, 1, 1)
    port.plug(endpoint(), "disk", hot=False)
    h = Pciehp(r, port)
    h.probe()
    done = []
    port.request_unplug("disk", lambda: done.append(1))
    h.button_then_remove_board()
    assert done == [] and len(deferred) == 1
    deferred[0]()
    assert done == [1]


def test_eject_is_idempotent_and_host_driven(rig):
    rig.port.plug(endpoint(), "disk", hot=False)
    assert rig.port.eject() is not None
    assert rig.port.eject() is None
    assert rig.port.device_id_in_slot is None


def test_masked_msi_is_held_pending_and_sent_on_unmask(rig):
    h = Pciehp(rig, rig.port)
    h.probe()
    h.c.write(0, PORT, h.msi + regs.MSI_MASK_64, 4, 1)
    rig.port.plug(endpoint(), "disk", hot=True)
    assert rig.msis == []
    assert h.c.read(0, PORT, h.msi + regs.MSI_PENDING_64, 4) == 1
    h.c.write(0, PORT, h.msi + regs.MSI_MASK_64, 4, 0)
    assert rig.msis == [(MSI_ADDR, MSI_DATA)]
    assert h.c.read(0, PORT, h.msi + regs.MSI_PENDING_64, 4) == 0


def test_msi_disabled_sends_nothing(rig):
    h = Pciehp(rig, rig.port)
    h.write_cmd(regs.SLTCTL_DLLSCE | regs.SLTCTL_HPIE, regs.SLTCTL_DLLSCE | regs.SLTCTL_HPIE)
    rig.port.plug(endpoint(), "disk", hot=True)
    assert rig.msis == []


def test_registers_linux_writes_keep_their_meaning(rig):
    h = Pciehp(rig, rig.port)
    h.wr(regs.EXP_LNKCTL, 0xFFFF)
    assert not h.rd(regs.EXP_LNKCTL) & regs.EXP_LNKCTL_RL  # retrain link reads 0
    h.wr(regs.EXP_SLTSTA, 0xFFFF)
    assert h.rd(regs.EXP_SLTSTA) == 0
    h.wr(regs.EXP_SLTCTL, 0xFFFF)
    assert h.rd(regs.EXP_SLTCTL) == regs.SLTCTL_WRITABLE
    h.wr(regs.EXP_LNKSTA, 0xFFFF)
    assert h.rd(regs.EXP_LNKSTA) & 0x03F0 == regs.EXP_LNKSTA_NLW_X1
