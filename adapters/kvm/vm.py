"""KvmVm: memory slots, dirty log, irqchip/PIT, interrupts, eventfds, VM-wide state."""

from __future__ import annotations

import errno
import os
from typing import Any

from adapters.kvm._lib import ffi, lib
from adapters.kvm.errors import KvmIoctlError, check
from domain.errors import SnapshotFormatError
from domain.memory import PAGE_SIZE
from domain.record import record

# Just below 4 GiB, out of the way of RAM and of the MMIO windows (Firecracker's choice):
# the TSS takes three pages, the EPT identity map one page below it.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000

STATE_VERSION = 1
_CHIPS = (("pic_master", "KVM_IRQCHIP_PIC_MASTER"), ("pic_slave", "KVM_IRQCHIP_PIC_SLAVE"),
          ("ioapic", "KVM_IRQCHIP_IOAPIC"))


@record
class _Slot:
    gpa: int
    size: int
    addr: int
    readonly: bool
    flags: int
    buf: Any  # cffi buffer pinning the host memory while KVM maps it
    bitmap: bytearray | None = None
    bitmap_c: Any = None


class KvmVm:
    def __init__(self, hv, fd: int):
        self._hv = hv
        self._fd = fd
        self._slots: dict[int, _Slot] = {}
        self._vcpus: dict[int, Any] = {}
        self.has_irqchip = False
        try:
            addr = ffi.new("uint64_t *", IDENTITY_MAP_ADDR)
            check(lib.px_ioctl_ptr(fd, lib.KVM_SET_IDENTITY_MAP_ADDR, addr), "KVM_SET_IDENTITY_MAP_ADDR")
            check(lib.px_ioctl_int(fd, lib.KVM_SET_TSS_ADDR, TSS_ADDR), "KVM_SET_TSS_ADDR")
        except BaseException:
            os.close(fd)
            raise

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def hypervisor(self):
        return self._hv

    # --- memory ----------------------------------------------------------------------------------

    def set_memory_region(self, slot: int, gpa: int, view: memoryview, *, readonly: bool = False,
                          log_dirty: bool = False) -> None:
        flags = (lib.KVM_MEM_READONLY if readonly else 0) | (lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        buf = ffi.from_buffer("char[]", view, require_writable=not readonly)
        addr, size = int(ffi.cast("uintptr_t", buf)), len(buf)
        old = self._slots.get(slot)
        if old is not None:
            # Only a change of dirty logging is allowed on a live slot; KVM would silently move
            # or resize it, which the port forbids.
            ffi.release(buf)
            if (old.gpa, old.size, old.addr, old.readonly) != (gpa, size, addr, readonly):
                raise KvmIoctlError("KVM_SET_USER_MEMORY_REGION", errno.EEXIST, f"slot {slot} is busy")
            check(lib.px_set_memory_region(self._fd, slot, flags, gpa, size, addr),
                  "KVM_SET_USER_MEMORY_REGION", f"slot {slot}")
            old.flags = flags
            return
        rc = lib.px_set_memory_region(self._fd, slot, flags, gpa, size, addr)
        if rc < 0:
            ffi.release(buf)
            check(rc, "KVM_SET_USER_MEMORY_REGION", f"slot {slot} at {gpa:#x}+{size:#x}")
        self._slots[slot] = _Slot(gpa, size, addr, readonly, flags, buf)

    def remove_memory_region(self, slot: int) -> None:
        s = self._slots.get(slot)
        if s is None:
            raise KvmIoctlError("KVM_SET_USER_MEMORY_REGION", errno.EINVAL, f"slot {slot} is not set")
        check(lib.px_set_memory_region(self._fd, slot, 0, s.gpa, 0, s.addr),
              "KVM_SET_USER_MEMORY_REGION", f"removing slot {slot}")
        del self._slots[slot]
        ffi.release(s.buf)

    def get_dirty_log(self, slot: int) -> bytes:
        s = self._slots.get(slot)
        if s is None:
            raise KvmIoctlError("KVM_GET_DIRTY_LOG", errno.ENOENT, f"slot {slot} is not set")
        if s.bitmap is None:
            # KVM writes whole longs: round the buffer up to 64 pages.
            s.bitmap = bytearray((s.size // PAGE_SIZE + 63) // 64 * 8)
            s.bitmap_c = ffi.from_buffer(s.bitmap)
        check(lib.px_get_dirty_log(self._fd, slot, s.bitmap_c), "KVM_GET_DIRTY_LOG", f"slot {slot}")
        return bytes(s.bitmap[: (s.size // PAGE_SIZE + 7) // 8])

    # --- interrupts and eventfds -------------------------------------------------------------------

    def create_irqchip(self) -> None:
        check(lib.px_ioctl_int(self._fd, lib.KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")
        check(lib.px_create_pit2(self._fd, lib.KVM_PIT_SPEAKER_DUMMY), "KVM_CREATE_PIT2")
        self.has_irqchip = True

    def set_irq_line(self, gsi: int, level: bool) -> None:
        check(lib.px_irq_line(self._fd, gsi, 1 if level else 0), "KVM_IRQ_LINE", f"gsi {gsi}")

    def signal_msi(self, address: int, data: int) -> bool:
        if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
            raise KvmIoctlError("KVM_SIGNAL_MSI", errno.EINVAL, f"address {address:#x} data {data:#x}")
        rc = lib.px_signal_msi(self._fd, address, data)
        if rc == -errno.EPERM:  # KVM's -1: no LAPIC matched the destination
            return False
        check(rc, "KVM_SIGNAL_MSI", f"address {address:#x} data {data:#x}")
        return rc > 0

    def register_irqfd(self, fd: int, gsi: int) -> None:
        check(lib.px_irqfd(self._fd, fd, gsi, 0), "KVM_IRQFD", f"fd {fd} gsi {gsi}")

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        check(lib.px_irqfd(self._fd, fd, gsi, lib.KVM_IRQFD_FLAG_DEASSIGN), "KVM_IRQFD",
              f"deassign fd {fd} gsi {gsi}")

    def _ioevent(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool, flags: int,
                 what: str) -> None:
        flags |= lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        check(lib.px_ioeventfd(self._fd, fd, addr, length, datamatch or 0, flags), "KVM_IOEVENTFD",
              f"{what} {'port' if pio else 'mmio'} {addr:#x}/{length}")

    def register_ioevent(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool) -> None:
        self._ioevent(fd, addr, length, datamatch, pio, 0, "assign")

    def unregister_ioevent(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool) -> None:
        self._ioevent(fd, addr, length, datamatch, pio, lib.KVM_IOEVENTFD_FLAG_DEASSIGN, "deassign")

    # --- vCPUs -------------------------------------------------------------------------------------

    def create_vcpu(self, index: int):
        from adapters.kvm.vcpu import KvmVcpu

        fd = check(lib.px_ioctl_int(self._fd, lib.KVM_CREATE_VCPU, index), "KVM_CREATE_VCPU", f"vcpu {index}")
        try:
            vcpu = KvmVcpu(self, index, fd)
        except BaseException:
            os.close(fd)
            raise
        self._vcpus[index] = vcpu
        return vcpu

    # --- state -------------------------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": STATE_VERSION, "irqchip": None, "pit": None}
        if self.has_irqchip:
            chips = {}
            for key, const in _CHIPS:
                chip = ffi.new("struct kvm_irqchip *")
                chip.chip_id = getattr(lib, const)
                check(lib.px_ioctl_ptr(self._fd, lib.KVM_GET_IRQCHIP, chip), "KVM_GET_IRQCHIP", key)
                chips[key] = bytes(ffi.buffer(chip))
            state["irqchip"] = chips
            pit = ffi.new("struct kvm_pit_state2 *")
            check(lib.px_ioctl_ptr(self._fd, lib.KVM_GET_PIT2, pit), "KVM_GET_PIT2")
            state["pit"] = bytes(ffi.buffer(pit))
        clock = ffi.new("struct kvm_clock_data *")
        check(lib.px_ioctl_ptr(self._fd, lib.KVM_GET_CLOCK, clock), "KVM_GET_CLOCK")
        state["clock"] = int(clock.clock)
        return state

    def restore_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise SnapshotFormatError("KVM VM state: missing or unknown version")
        if set(state) != {"version", "irqchip", "pit", "clock"}:
            raise SnapshotFormatError("KVM VM state: unexpected or missing fields")
        clock_value = state["clock"]
        if not isinstance(clock_value, int) or not 0 <= clock_value < 1 << 64:
            raise SnapshotFormatError("KVM VM state: invalid clock")
        chips, pit_bytes = state["irqchip"], state["pit"]
        if (chips is None) != (not self.has_irqchip) or (pit_bytes is None) != (not self.has_irqchip):
            raise SnapshotFormatError("KVM VM state: irqchip presence does not match this VM")
        if chips is not None:
            if not isinstance(chips, dict) or set(chips) != {k for k, _ in _CHIPS}:
                raise SnapshotFormatError("KVM VM state: invalid irqchip section")
            structs = []
            for key, const in _CHIPS:
                chip = _from_bytes("struct kvm_irqchip *", chips[key], f"irqchip {key}")
                chip.chip_id = getattr(lib, const)  # never trust the id inside the blob
                structs.append((key, chip))
            pit = _from_bytes("struct kvm_pit_state2 *", pit_bytes, "pit")
            for key, chip in structs:
                check(lib.px_ioctl_ptr(self._fd, lib.KVM_SET_IRQCHIP, chip), "KVM_SET_IRQCHIP", key)
            check(lib.px_ioctl_ptr(self._fd, lib.KVM_SET_PIT2, pit), "KVM_SET_PIT2")
        clock = ffi.new("struct kvm_clock_data *")
        clock.clock = clock_value
        check(lib.px_ioctl_ptr(self._fd, lib.KVM_SET_CLOCK, clock), "KVM_SET_CLOCK")

    def close(self) -> None:
        for vcpu in self._vcpus.values():
            vcpu.close()
        self._vcpus.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for s in self._slots.values():
            ffi.release(s.buf)
            if s.bitmap_c is not None:
                ffi.release(s.bitmap_c)
        self._slots.clear()


def _from_bytes(ctype: str, blob: object, what: str):
    """A fresh struct filled from untrusted bytes of exactly the struct's size."""
    obj = ffi.new(ctype)
    if not isinstance(blob, (bytes, bytearray)) or len(blob) != ffi.sizeof(obj[0]):
        raise SnapshotFormatError(f"KVM state: {what} has the wrong size")
    ffi.buffer(obj)[:] = blob
    return obj
