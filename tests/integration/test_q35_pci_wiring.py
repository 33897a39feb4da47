"""q35's PCI as the composition root builds it (command line -> container -> machine ->
application.pci), on the test hypervisor, with a scripted guest doing what Linux does through
the VM's own buses: enumerate through 0xCF8, drive a virtio-blk-pci disk whose notify reaches the
device through the ioeventfd the machine registered at the BAR address and whose completion
leaves as an MSI-X message (signal_msi), then hot-plug into a root port and unplug through the
guest's pciehp protocol (KVM's path: no fake guest agent)."""

from __future__ import annotations

import os
import struct
from types import SimpleNamespace

import pytest

from tests.integration.waiting import until
from dependency_injector import providers

from application.container import Container, Runtime
from domain.cmdline import parse_cmdline
from domain.config import ACCEL_TEST, DeviceConfig
from domain.devices.pci import layout, regs
from domain.devices.pci import virtio_pci as vp
from domain.devices.pci.device import BarRegion
from domain.devices.pci.host import devfn
from domain.devices.pci.mock import BusAccess, VirtioPciDriver
from domain.devices.virtio.mock import MockQueue
from domain.events import DeviceDeleted

RINGS = 0x200000
HDR, DATA, STATUS = 0x210000, 0x211000, 0x212000
LAPIC = 0xFEE0_0000
PORT = devfn(2)




@pytest.fixture
def q35(tmp_path):
    runtimes = []
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 64 + bytes(8 << 20))
    (tmp_path / "hot.img").write_bytes(bytes(1 << 20))

    def make(kvm_unplug: bool = True):
        cfg = parse_cmdline(["-accel", "test", "-machine", "q35", "-m", "256",
                             "-device", "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x2",
                             "-drive", f"file={disk},id=d0",
                             "-device", "virtio-blk-pci,id=d0,drive=d0,bus=pcie.0,addr=0x3",
                             "-device", "virtio-balloon-pci,id=balloon0,bus=pcie.0,addr=0x4"])
        container = Container()
        container.accel.override(ACCEL_TEST)
        if kvm_unplug:
            container.guest_agent.override(providers.Object(None))
        rt = Runtime(cfg, container)
        events: list = []
        rt.events = SimpleNamespace(emit=events.append)
        rt._request_exit = lambda code: None
        rt._build_vm()
        rt.vm.devices.start()
        runtimes.append(rt)
        dm = rt.vm.devices
        return SimpleNamespace(rt=rt, dm=dm, hv=rt.vm.hv_vm, events=events, bus=BusAccess(dm.pio, dm.mmio),
                               hot=str(tmp_path / "hot.img"))

    yield make
    for rt in runtimes:
        rt._release_quietly()


def scan(c):
    out = {}
    for bus in (0, 1):
        for slot in range(32):
            vid = c.read(bus, devfn(slot), regs.VENDOR_ID, 4)
            if vid & 0xFFFF != 0xFFFF:
                out[(bus, slot)] = vid
    return out


def test_enumeration_firmware_placement_and_ecam(q35):
    vm = q35()
    c = vm.bus.conf1()
    assert scan(c) == {(0, 0): regs.DEVICE_Q35_MCH << 16 | regs.VENDOR_INTEL,
                       (0, 2): regs.DEVICE_REDHAT_ROOT_PORT << 16 | regs.VENDOR_REDHAT,
                       (0, 3): 0x1042_1AF4, (0, 4): 0x1045_1AF4}
    assert c.read(0, PORT, regs.PRIMARY_BUS, 4) & 0xFFFFFF == 0x01_01_00
    bar = c.read(0, devfn(3), regs.BAR0) & ~0xF
    assert layout.PCI_MMIO_BASE <= bar < layout.PCI_MMIO_BASE + layout.PCI_MMIO_SIZE
    hit = vm.dm.mmio.find(bar)
    assert hit is not None and isinstance(hit[0].device, BarRegion)
    notify = {(e.addr, e.length) for e in vm.hv.ioevents}
    assert {(bar + vp.NOTIFY_OFFSET, 2)} <= notify  # virtio-blk has one queue
    ecam_vendor = vm.bus.mmio_read(layout.ECAM_BASE | devfn(4) << 12, 4)
    assert ecam_vendor == 0x1045_1AF4


def test_virtio_blk_pci_read_through_ioeventfd_and_msix(q35):
    vm = q35()
    mem = vm.rt.vm.memory
    drv = VirtioPciDriver(vm.bus, 0, devfn(3))
    drv.enable_msix([(LAPIC, 0x40), (LAPIC, 0x41)])
    mq = MockQueue(mem, 16, RINGS)
    assert drv.start([mq]) & 0x4  # DRIVER_OK
    mem.write(HDR, struct.pack("<IIQ", 0, 0, 0))  # VIRTIO_BLK_T_IN, sector 0
    mem.write(STATUS, b"\xff")
    head = mq.add_chain([(HDR, 16, False), (DATA, 512, True), (STATUS, 1, True)])
    address = drv.notify_address(0)
    fd = next(e.fd for e in vm.hv.ioevents if e.addr == address)
    os.eventfd_write(fd, 1)  # what KVM does when the guest writes the notify register
    until(lambda: mq.used_idx() == 1, "the request to complete")
    assert mq.take_used() == [(head, 513)]
    assert mem.read(STATUS, 1) == b"\x00" and mem.read(DATA, 256) == bytes(range(256))
    until(lambda: (LAPIC, 0x41) in vm.hv.msi_log, "the queue's MSI-X message")


class Guest:
    """The guest's pciehp on root port 00:02.0, through 0xCF8/0xCFC."""

    def __init__(self, vm):
        self.c = vm.bus.conf1()
        self.exp = self.c.find(0, PORT, regs.CAP_ID_EXP)
        msi = self.c.find(0, PORT, regs.CAP_ID_MSI)
        self.c.write(0, PORT, msi + regs.MSI_ADDRESS_LO, 4, LAPIC)
        self.c.write(0, PORT, msi + regs.MSI_DATA_64, 2, 0x50)
        self.c.write(0, PORT, msi + regs.MSI_FLAGS, 2, regs.MSI_FLAGS_ENABLE)
        self.ctl(regs.SLTCTL_HPIE | regs.SLTCTL_DLLSCE | regs.SLTCTL_ABPE,
                 regs.SLTCTL_HPIE | regs.SLTCTL_DLLSCE | regs.SLTCTL_ABPE | regs.SLTCTL_PDCE)

    def sta(self):
        return self.c.read(0, PORT, self.exp + regs.EXP_SLTSTA, 2)

    def clear(self):
        self.c.write(0, PORT, self.exp + regs.EXP_SLTSTA, 2, self.sta() & regs.SLTSTA_W1C)

    def ctl(self, value, mask):
        old = self.c.read(0, PORT, self.exp + regs.EXP_SLTCTL, 2)
        self.c.write(0, PORT, self.exp + regs.EXP_SLTCTL, 2, (old & ~mask) | (value & mask))


def test_hot_plug_and_unplug_through_the_guest_pciehp(q35):
    vm = q35(kvm_unplug=True)
    guest = Guest(vm)
    vm.dm.blockdev_add("hot", vm.hot, readonly=False, direct=False)
    vm.dm.device_add_config(DeviceConfig("virtio-blk-pci", id="hot", drive="hot", bus="pcie.1", addr=0),
                            hotplugged=True)
    assert (LAPIC, 0x50) in vm.hv.msi_log
    assert guest.sta() & (regs.SLTSTA_PDS | regs.SLTSTA_PDC | regs.SLTSTA_DLLSC) == (
        regs.SLTSTA_PDS | regs.SLTSTA_PDC | regs.SLTSTA_DLLSC)
    guest.clear()
    assert guest.c.read(1, 0, regs.VENDOR_ID, 2) == 0xFFFF  # slot not powered yet
    guest.ctl(regs.SLTCTL_PWR_IND_ON, regs.SLTCTL_PCC | regs.SLTCTL_PIC)  # board_added
    assert guest.c.read(1, 0, regs.VENDOR_ID, 4) == 0x1042_1AF4
    bar = guest.c.read(1, 0, regs.BAR0) & ~0xF
    base = guest.c.read(0, PORT, regs.MEMORY_BASE, 2) << 16
    assert base <= bar < base + (2 << 20)  # inside the port's window
    guest.c.write(1, 0, regs.COMMAND, 2, regs.COMMAND_MEMORY)  # the driver enables it
    assert vm.dm.mmio.find(bar) is not None
    assert any(e.addr == bar + vp.NOTIFY_OFFSET for e in vm.hv.ioevents)

    msis = len(vm.hv.msi_log)
    assert vm.dm.device_del("hot") is False  # the guest must acknowledge
    assert guest.sta() & regs.SLTSTA_ABP and len(vm.hv.msi_log) == msis + 1
    guest.clear()
    guest.ctl(regs.SLTCTL_PWR_IND_BLINK, regs.SLTCTL_PIC)
    guest.ctl(regs.SLTCTL_PCC, regs.SLTCTL_PCC)
    assert not any(isinstance(e, DeviceDeleted) for e in vm.events)  # power off alone is not it
    guest.ctl(regs.SLTCTL_PWR_IND_OFF, regs.SLTCTL_PIC)
    until(lambda: any(isinstance(e, DeviceDeleted) for e in vm.events), "DEVICE_DELETED")
    assert [e.device for e in vm.events if isinstance(e, DeviceDeleted)] == ["hot"]
    assert vm.dm.mmio.find(bar) is None
    assert not any(e.addr == bar + vp.NOTIFY_OFFSET for e in vm.hv.ioevents)
    assert not guest.sta() & regs.SLTSTA_PDS
    vm.dm.blockdev_del("hot")  # no longer in use


def test_test_hypervisor_guest_agent_still_answers_for_the_guest(q35):
    vm = q35(kvm_unplug=False)
    vm.dm.blockdev_add("hot", vm.hot, readonly=False, direct=False)
    vm.dm.device_add_config(DeviceConfig("virtio-blk-pci", id="hot", drive="hot", bus="pcie.1", addr=0),
                            hotplugged=True)
    assert vm.dm.device_del("hot") is False
    until(lambda: any(isinstance(e, DeviceDeleted) for e in vm.events), "DEVICE_DELETED")
    port = vm.dm.platform.pci.ports["pcie.1"]
    assert port.slot_device is None
