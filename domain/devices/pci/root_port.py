"""pcie-root-port: a PCI Express root port whose slot does native hot-plug (Linux's pciehp).

The slot has an attention button, a power controller and both indicators, and no command
completion (so the driver never waits on Slot Control writes). Its interrupt is MSI.

Hot-add (``plug(hot=True)``): presence detect and link active come up, and Presence Detect
Changed + Data Link Layer State Changed raise the interrupt; pciehp powers the slot on and
scans it. While the slot is powered off the function behind it does not answer configuration
cycles.

Hot-unplug is a request to the guest (``request_unplug``): the attention button is pressed;
pciehp blinks the power indicator for 5 s, unbinds the driver, turns the power controller off and
then the power indicator off. That last write, power off with the indicator off, is the guest's
acknowledgement: the function leaves the bus, presence drops, and ``done`` runs (through
``defer``, outside the configuration access). A slot the guest never powered on is emptied at
once. The interrupt follows PCIe 6.7.3.4: a message is sent when "hot-plug interrupt enabled
and some enabled event bit set" becomes true, so the driver must clear the bits for the next.
"""

from __future__ import annotations

from typing import Callable

from domain.devices.pci import regs
from domain.devices.pci.bridge import PciBridge
from domain.devices.pci.device import overlaps
from domain.devices.pci.host import PciFunction
from domain.devices.pci.msi import MsiCapability, SendMsi
from domain.errors import DeviceNotFoundError, DuplicateIdError

_EVENT_ENABLES = ((regs.SLTSTA_ABP, regs.SLTCTL_ABPE), (regs.SLTSTA_PFD, regs.SLTCTL_PFDE),
                  (regs.SLTSTA_MRLSC, regs.SLTCTL_MRLSCE), (regs.SLTSTA_PDC, regs.SLTCTL_PDCE),
                  (regs.SLTSTA_CC, regs.SLTCTL_CCIE), (regs.SLTSTA_DLLSC, regs.SLTCTL_DLLSCE))
_SLOT_ON = regs.SLTCTL_PWR_IND_ON | regs.SLTCTL_ATTN_IND_OFF
_SLOT_OFF = regs.SLTCTL_PCC | regs.SLTCTL_PWR_IND_OFF | regs.SLTCTL_ATTN_IND_OFF


def _run(fn: Callable[[], object]) -> None:
    fn()


def powered_off(sltctl: int) -> bool:
    """Power controller off and power indicator off: how pciehp leaves a slot it emptied."""
    return bool(sltctl & regs.SLTCTL_PCC) and sltctl & regs.SLTCTL_PIC == regs.SLTCTL_PWR_IND_OFF


class PcieRootPort(PciBridge):
    def __init__(self, *, port_number: int, send_msi: SendMsi, slot_number: int | None = None,
                 defer: Callable[[Callable[[], None]], None] = _run, name: str = ""):
        super().__init__(vendor=regs.VENDOR_REDHAT, device=regs.DEVICE_REDHAT_ROOT_PORT,
                         config_size=regs.CONFIG_SPACE_EXP_SIZE, name=name)
        self.port_number = port_number
        self._defer = defer
        c = self.config
        self.exp = e = c.add_capability(regs.CAP_ID_EXP, regs.EXP_CAP_SIZE)
        c.set(e + regs.EXP_FLAGS, 2, regs.EXP_FLAGS_VERS2 | regs.EXP_TYPE_ROOT_PORT << 4 | regs.EXP_FLAGS_SLOT)
        c.set(e + regs.EXP_DEVCAP, 4, regs.EXP_DEVCAP_RBER)
        c.set_wmask(e + regs.EXP_DEVCTL, 2, 0x7FFF)
        c.set(e + regs.EXP_DEVCTL, 2, 0x2810)  # relaxed ordering, no snoop, 512-byte reads
        c.set_w1c(e + regs.EXP_DEVSTA, 2, 0x000F)
        c.set(e + regs.EXP_LNKCAP, 4, regs.EXP_LNKCAP_SPEED_2_5GT | regs.EXP_LNKCAP_WIDTH_X1
              | regs.EXP_LNKCAP_DLLLARC | (port_number & 0xFF) << 24)
        c.set_wmask(e + regs.EXP_LNKCTL, 2, 0x0FDB)  # not Retrain Link: it reads as 0
        c.set(e + regs.EXP_LNKSTA, 2, regs.EXP_LNKSTA_SPEED_2_5GT | regs.EXP_LNKSTA_NLW_X1 | regs.EXP_LNKSTA_SLC)
        c.set_w1c(e + regs.EXP_LNKSTA, 2, regs.EXP_LNKSTA_W1C)
        psn = port_number if slot_number is None else slot_number
        c.set(e + regs.EXP_SLTCAP, 4, regs.SLTCAP_ABP | regs.SLTCAP_PCP | regs.SLTCAP_AIP | regs.SLTCAP_PIP
              | regs.SLTCAP_HPC | regs.SLTCAP_NCCS | (psn & 0x1FFF) << regs.SLTCAP_PSN_SHIFT)
        c.set_wmask(e + regs.EXP_SLTCTL, 2, regs.SLTCTL_WRITABLE)
        c.set(e + regs.EXP_SLTCTL, 2, _SLOT_OFF)
        c.set_w1c(e + regs.EXP_SLTSTA, 2, regs.SLTSTA_W1C)
        c.set_wmask(e + regs.EXP_RTCTL, 2, regs.RTCTL_WRITABLE)
        c.set_w1c(e + regs.EXP_RTSTA, 4, regs.RTSTA_PME)
        c.set(e + regs.EXP_LNKCAP2, 4, 0x2)  # 2.5 GT/s
        c.set(e + regs.EXP_LNKCTL2, 2, 0x1)
        self.msi = MsiCapability(c, send_msi)
        self.caps.append(self.msi)
        self._irq_level = False
        self._unplug_done: Callable[[], None] | None = None
        self._unplug_id: str | None = None
        self.device_id_in_slot: str | None = None

    # --- registers -----------------------------------------------------------------------------

    def _reg(self, reg: int, size: int = 2) -> int:
        return self.config.get(self.exp + reg, size)

    def _set_reg(self, reg: int, value: int, size: int = 2) -> None:
        self.config.set(self.exp + reg, size, value)

    @property
    def slot_control(self) -> int:
        return self._reg(regs.EXP_SLTCTL)

    @property
    def slot_status(self) -> int:
        return self._reg(regs.EXP_SLTSTA)

    @property
    def link_status(self) -> int:
        return self._reg(regs.EXP_LNKSTA)

    @property
    def slot_powered(self) -> bool:
        return not self.slot_control & regs.SLTCTL_PCC

    @property
    def unplug_pending(self) -> bool:
        return self._unplug_done is not None

    def visible_devices(self) -> dict[int, PciFunction]:
        return self.secondary_bus.devices if self.slot_powered else {}

    @property
    def slot_device(self) -> PciFunction | None:
        return self.secondary_bus.devices.get(0)

    def _set_presence(self, present: bool) -> None:
        sta, lnk = self.slot_status, self.link_status
        sta = sta | regs.SLTSTA_PDS if present else sta & ~regs.SLTSTA_PDS
        lnk = lnk | regs.EXP_LNKSTA_DLLLA if present else lnk & ~regs.EXP_LNKSTA_DLLLA
        self._set_reg(regs.EXP_SLTSTA, sta | regs.SLTSTA_PDC | regs.SLTSTA_DLLSC)
        self._set_reg(regs.EXP_LNKSTA, lnk)

    def _update_irq(self) -> None:
        ctl, sta = self.slot_control, self.slot_status
        events = any(sta & ev and ctl & en for ev, en in _EVENT_ENABLES)
        level = bool(ctl & regs.SLTCTL_HPIE) and events
        if level and not self._irq_level:
            self.msi.notify()
        self._irq_level = level

    # --- host side: plug and unplug ----------------------------------------------------------------

    def plug(self, device: PciFunction, device_id: str, *, hot: bool) -> None:
        """Put a function in the slot. Cold (before the guest runs): the slot starts powered,
        as firmware leaves an occupied slot. Hot: presence and link come up and the guest is
        told through the hot-plug interrupt."""
        with self.lock:
            if self.slot_device is not None:
                raise DuplicateIdError(f"root port '{self.name}' already holds '{self.device_id_in_slot}'")
            self.secondary_bus.attach(0, device)
            self.device_id_in_slot = device_id
            if hot:
                self._set_presence(True)
                self._update_irq()
            else:
                self._set_reg(regs.EXP_SLTSTA, self.slot_status | regs.SLTSTA_PDS)
                self._set_reg(regs.EXP_LNKSTA, self.link_status | regs.EXP_LNKSTA_DLLLA)
                self._set_reg(regs.EXP_SLTCTL, (self.slot_control & ~(regs.SLTCTL_PCC | regs.SLTCTL_PIC
                                                                      | regs.SLTCTL_AIC)) | _SLOT_ON)

    def request_unplug(self, device_id: str, done: Callable[[], None]) -> None:
        """GuestAgent.request_unplug: press the attention button; ``done`` runs once the guest
        powered the slot off (at once if the slot is not powered)."""
        with self.lock:
            if self.slot_device is None or self.device_id_in_slot != device_id:
                raise DeviceNotFoundError(f"Device '{device_id}' is not in root port '{self.name}'")
            if self._unplug_done is not None:
                raise DuplicateIdError(f"device '{device_id}' is already being removed")
            self._unplug_done, self._unplug_id = done, device_id
            if not self.slot_powered:
                finish = self._eject_locked()
            else:
                finish = None
                self._set_reg(regs.EXP_SLTSTA, self.slot_status | regs.SLTSTA_ABP)
                self._update_irq()
        if finish is not None:
            self._defer(finish)

    def eject(self) -> PciFunction | None:
        """Take the function out now, whatever the guest does (the host finishing a removal the
        guest agreed to elsewhere). Idempotent; returns what was in the slot."""
        with self.lock:
            device = self.slot_device
            if device is not None:
                self._eject_locked()
            return device

    def _eject_locked(self) -> Callable[[], None] | None:
        self.secondary_bus.detach(0)
        self.device_id_in_slot = None
        self._set_presence(False)
        self._update_irq()
        done, self._unplug_done, self._unplug_id = self._unplug_done, None, None
        return done

    # --- snapshot ----------------------------------------------------------------------------------

    def restore_state(self, state: dict) -> None:
        """Presence and link follow what is in the slot here, not the snapshot; no message is
        sent for events the guest had not cleared yet (it was told before the snapshot)."""
        with self.lock:
            super().restore_state(state)
            present = self.slot_device is not None
            sta, lnk = self.slot_status & ~regs.SLTSTA_PDS, self.link_status & ~regs.EXP_LNKSTA_DLLLA
            self._set_reg(regs.EXP_SLTSTA, sta | (regs.SLTSTA_PDS if present else 0))
            self._set_reg(regs.EXP_LNKSTA, lnk | (regs.EXP_LNKSTA_DLLLA if present else 0))
            ctl = self.slot_control
            self._irq_level = bool(ctl & regs.SLTCTL_HPIE) and any(
                self.slot_status & ev and ctl & en for ev, en in _EVENT_ENABLES)

    # --- guest side ------------------------------------------------------------------------------

    def write_config(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            sltctl = self.exp + regs.EXP_SLTCTL
            old_ctl = self.slot_control
            super().write_config(offset, size, value)
            if not overlaps(offset, size, sltctl, 4):  # Slot Control or Slot Status
                return
            finish = None
            new_ctl = self.slot_control
            if (self._unplug_done is not None and self.slot_device is not None
                    and powered_off(new_ctl) and not powered_off(old_ctl)):
                finish = self._eject_locked()
            self._update_irq()
        if finish is not None:
            self._defer(finish)
