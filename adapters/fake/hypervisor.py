"""An in-memory hypervisor with KVM's rules, for tests and `-accel test`.

What it shares with KVM is pinned by tests/contract (the same tests run on both): memory slot
rules and errnos, dirty logging, irqfd/ioeventfd rules, the I/O and MMIO exit protocol (exit data
is a view the handler fills; IN and MMIO-read results are taken from it when run() is called
again), kicks (immediate-exit semantics), vCPU index rules, state round trips.

The guest is a tiny interpreter (adapters.fake.x86) running from guest RAM at RIP, on the
caller's thread. The fake guest *idles* on anything it cannot run: an unsupported instruction,
or HLT with the in-kernel irqchip (KVM handles that HLT in the kernel): run() then blocks until
kick() and returns Interrupted, and keeps idling on later runs. Without an irqchip HLT returns
Hlt. An instruction fetch outside RAM returns InternalError(1), KVM's emulation failure.
Interrupts are recorded (irq line levels, irqfd signals), never delivered to the fake guest.

Tests and the migration code make the fake guest dirty memory with FakeVm.guest_write() and
FakeVm.guest_touch_pages(): writes land in the real buffers and mark pages in the dirty log.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import threading
import time
from typing import Any, Iterable

from adapters.fake import x86
from domain import vcpu_exit as ve
from domain.cpu_features import check_features
from domain.cpu_state import GPR_NAMES, DescriptorTable, Regs, Segment, Sregs, VcpuSetup
from domain.errors import GuestMemoryError, HypervisorError, SnapshotFormatError
from domain.memory import PAGE_SIZE
from domain.record import field, record

STATE_VERSION = 1
MAX_MEMSLOTS = 32764  # what KVM answers for KVM_CAP_NR_MEMSLOTS on x86
_IOEVENT_LENGTHS = (0, 1, 2, 4, 8)
_INTERNAL_ERROR_EMULATION = 1
# x86 register numbers (the interpreter's gpr index) in instruction-encoding order.
_X86_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi") + GPR_NAMES[8:]


class FakeHvError(HypervisorError, OSError):
    """The fake's refusal, with the errno KVM gives for the same request."""

    def __init__(self, op: str, err: int, detail: str = ""):
        OSError.__init__(self, err, os.strerror(err))
        self.op = op
        self.detail = detail

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.op} failed: {self.strerror} [{errno.errorcode.get(self.errno, self.errno)}]{extra}"


class FakeHypervisor:
    def __init__(self, kind: str = "test", max_vcpus: int = 255):
        self.kind = kind
        self._max_vcpus = max_vcpus

    def max_vcpus(self) -> int:
        return self._max_vcpus

    def create_vm(self) -> "FakeVm":
        return FakeVm(self._max_vcpus)


@record
class _Slot:
    slot: int
    gpa: int
    size: int
    view: memoryview
    readonly: bool
    log_dirty: bool
    dirty: set[int] = field(default_factory=set)

    @property
    def end(self) -> int:
        return self.gpa + self.size


@record(frozen=True)
class _IoEvent:
    fd: int
    addr: int
    length: int
    datamatch: int | None
    pio: bool


def _is_eventfd(op: str, fd: int) -> None:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        raise FakeHvError(op, errno.EBADF, f"fd {fd}") from None
    if target != "anon_inode:[eventfd]":
        raise FakeHvError(op, errno.EINVAL, f"fd {fd} is not an eventfd")


class FakeVm:
    def __init__(self, max_vcpus: int = 255):
        self._max_vcpus = max_vcpus
        self._lock = threading.RLock()
        self._slots: dict[int, _Slot] = {}
        self._by_gpa: tuple[_Slot, ...] = ()
        self._vcpus: dict[int, FakeVcpu] = {}
        self.has_irqchip = False
        self.irq_levels: dict[int, bool] = {}
        self.irq_log: list[tuple[int, bool]] = []
        self.irqfds: dict[int, int] = {}  # eventfd -> gsi
        self.ioevents: list[_IoEvent] = []
        self.irqfd_signals: dict[int, int] = {}  # gsi -> times its irqfd fired (poll_irqfds)
        self.msi_log: list[tuple[int, int]] = []  # (address, data) of every signal_msi
        self._clock_base = time.monotonic_ns()
        self.closed = False

    # --- memory ----------------------------------------------------------------------------------

    def set_memory_region(self, slot: int, gpa: int, view: memoryview, *, readonly: bool = False,
                          log_dirty: bool = False) -> None:
        op = "set_memory_region"
        # Probe without keeping a view: a refusal's traceback must not pin the caller's mmap.
        with memoryview(view) as probe:
            size, is_readonly, owner = probe.nbytes, probe.readonly, probe.obj
        if not readonly and is_readonly:
            raise FakeHvError(op, errno.EFAULT, f"slot {slot}: buffer is read-only")
        if not 0 <= slot < MAX_MEMSLOTS or gpa % PAGE_SIZE or size % PAGE_SIZE or not size:
            raise FakeHvError(op, errno.EINVAL, f"slot {slot} at {gpa:#x}+{size:#x}")
        if gpa < 0 or gpa + size > 1 << 64:
            raise FakeHvError(op, errno.EINVAL, f"slot {slot} at {gpa:#x}+{size:#x}")
        with self._lock:
            old = self._slots.get(slot)
            if old is not None:
                same = (old.gpa, old.size, old.readonly) == (gpa, size, readonly) and old.view.obj is owner
                if not same:
                    raise FakeHvError(op, errno.EEXIST, f"slot {slot} is busy")
                if log_dirty != old.log_dirty:
                    old.log_dirty = log_dirty
                    old.dirty.clear()  # KVM starts a fresh, empty bitmap
                return
            for s in self._slots.values():
                if gpa < s.end and s.gpa < gpa + size:
                    raise FakeHvError(op, errno.EEXIST, f"slot {slot} at {gpa:#x}+{size:#x} overlaps slot {s.slot}")
            self._slots[slot] = _Slot(slot, gpa, size, memoryview(view).cast("B"), readonly, log_dirty)
            self._by_gpa = tuple(sorted(self._slots.values(), key=lambda s: s.gpa))

    def remove_memory_region(self, slot: int) -> None:
        with self._lock:
            s = self._slots.pop(slot, None)
            if s is None:
                raise FakeHvError("remove_memory_region", errno.EINVAL, f"slot {slot} is not set")
            self._by_gpa = tuple(sorted(self._slots.values(), key=lambda s: s.gpa))
            s.view.release()

    def get_dirty_log(self, slot: int) -> bytes:
        with self._lock:
            s = self._slots.get(slot)
            if s is None or not s.log_dirty:
                raise FakeHvError("get_dirty_log", errno.ENOENT, f"slot {slot} has no dirty log")
            bitmap = bytearray((s.size // PAGE_SIZE + 7) // 8)
            for page in s.dirty:
                bitmap[page >> 3] |= 1 << (page & 7)
            s.dirty.clear()
            return bytes(bitmap)

    def _slot_at(self, addr: int, size: int) -> _Slot | None:
        for s in self._by_gpa:
            if s.gpa <= addr and addr + size <= s.end:
                return s
        return None

    def _mark(self, s: _Slot, addr: int, length: int) -> None:
        if s.log_dirty and length:
            first, last = (addr - s.gpa) // PAGE_SIZE, (addr + length - 1 - s.gpa) // PAGE_SIZE
            s.dirty.update(range(first, last + 1))

    def guest_write(self, gpa: int, data) -> None:
        """The fake guest writes ``data`` at ``gpa``: into guest RAM, marking pages dirty."""
        data = memoryview(data).cast("B")
        with self._lock:
            s = self._slot_at(gpa, len(data))
            if s is None or s.readonly:
                raise GuestMemoryError(f"fake guest write {gpa:#x}+{len(data):#x} outside writable RAM")
            s.view[gpa - s.gpa : gpa - s.gpa + len(data)] = data
            self._mark(s, gpa, len(data))

    def guest_touch_pages(self, gpas: Iterable[int]) -> None:
        """The fake guest writes each page holding one of ``gpas`` (contents unchanged)."""
        with self._lock:
            for gpa in gpas:
                s = self._slot_at(gpa, 1)
                if s is None or s.readonly:
                    raise GuestMemoryError(f"fake guest write {gpa:#x} outside writable RAM")
                self._mark(s, gpa, 1)

    # the interpreter's bus (x86.Bus) -----------------------------------------------------------

    # A slot removed (view released) under a running vCPU reads as unmapped: ValueError.

    def fetch(self, addr: int, length: int) -> bytes:
        s = self._slot_at(addr, 1)
        if s is None:
            return b""
        off = addr - s.gpa
        try:
            return bytes(s.view[off : min(off + length, s.size)])
        except ValueError:
            return b""

    def read(self, addr: int, size: int) -> int | None:
        s = self._slot_at(addr, size)
        if s is None:
            return None
        off = addr - s.gpa
        try:
            return int.from_bytes(s.view[off : off + size], "little")
        except ValueError:
            return None

    def write(self, addr: int, size: int, value: int) -> bool:
        s = self._slot_at(addr, size)
        if s is None or s.readonly:
            return False  # an MMIO write, as KVM turns writes to read-only slots into
        off = addr - s.gpa
        try:
            s.view[off : off + size] = value.to_bytes(size, "little")
        except ValueError:
            return False
        self._mark(s, addr, size)
        return True

    def ioevent(self, pio: bool, addr: int, size: int, value: int) -> bool:
        """KVM's ioeventfd_in_range: exact address, length 0 or equal, wildcard or same value."""
        for e in self.ioevents:
            if e.pio != pio or e.addr != addr:
                continue
            if e.length and (e.length != size or (e.datamatch is not None and e.datamatch != value)):
                continue
            os.eventfd_write(e.fd, 1)
            return True
        return False

    # --- interrupts and eventfds -------------------------------------------------------------------

    def create_irqchip(self) -> None:
        with self._lock:
            if self.has_irqchip:
                raise FakeHvError("create_irqchip", errno.EEXIST, "irqchip already created")
            if self._vcpus:
                raise FakeHvError("create_irqchip", errno.EINVAL, "vCPUs already created")
            self.has_irqchip = True

    def set_irq_line(self, gsi: int, level: bool) -> None:
        if not self.has_irqchip:
            raise FakeHvError("set_irq_line", errno.ENXIO, f"gsi {gsi}: no irqchip")
        with self._lock:
            self.irq_levels[gsi] = bool(level)
            self.irq_log.append((gsi, bool(level)))

    def signal_msi(self, address: int, data: int) -> bool:
        """Recorded in ``msi_log``; True when the destination APIC id (address bits 19:12) is a
        vCPU, as KVM reports delivery (the fake guest never takes the interrupt)."""
        if not self.has_irqchip:
            raise FakeHvError("signal_msi", errno.EINVAL, "no irqchip")
        if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
            raise FakeHvError("signal_msi", errno.EINVAL, f"address {address:#x} data {data:#x}")
        with self._lock:
            self.msi_log.append((address, data))
            return (address >> 12) & 0xFF in self._vcpus

    def register_irqfd(self, fd: int, gsi: int) -> None:
        op = "register_irqfd"
        with self._lock:
            if not self.has_irqchip:
                raise FakeHvError(op, errno.EINVAL, f"fd {fd} gsi {gsi}: no irqchip")
            _is_eventfd(op, fd)
            if fd in self.irqfds:
                raise FakeHvError(op, errno.EBUSY, f"fd {fd} already routes gsi {self.irqfds[fd]}")
            self.irqfds[fd] = gsi

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        with self._lock:
            _is_eventfd("unregister_irqfd", fd)
            if self.irqfds.get(fd) == gsi:  # KVM ignores unknown pairs silently
                del self.irqfds[fd]

    def poll_irqfds(self) -> dict[int, int]:
        """Consume pending irqfd signals (as KVM's injection does): {gsi: count} since last poll."""
        fired: dict[int, int] = {}
        with self._lock:
            fds = dict(self.irqfds)
        for fd, gsi in fds.items():
            if select.select([fd], [], [], 0)[0]:
                n = os.eventfd_read(fd)
                fired[gsi] = fired.get(gsi, 0) + n
                self.irqfd_signals[gsi] = self.irqfd_signals.get(gsi, 0) + n
        return fired

    def register_ioevent(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool) -> None:
        op = "register_ioevent"
        what = f"{'port' if pio else 'mmio'} {addr:#x}/{length}"
        if length not in _IOEVENT_LENGTHS or addr < 0 or addr + length > 1 << 64:
            raise FakeHvError(op, errno.EINVAL, what)
        if not length and datamatch is not None:
            raise FakeHvError(op, errno.EINVAL, f"{what}: datamatch needs a length")
        _is_eventfd(op, fd)
        new = _IoEvent(fd, addr, length, datamatch, bool(pio))
        with self._lock:
            for e in self.ioevents:  # KVM's ioeventfd_check_collision
                if (e.pio == new.pio and e.addr == addr
                        and (not e.length or not length
                             or (e.length == length
                                 and (e.datamatch is None or datamatch is None or e.datamatch == datamatch)))):
                    raise FakeHvError(op, errno.EEXIST, what)
            self.ioevents.append(new)

    def unregister_ioevent(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool) -> None:
        with self._lock:
            try:
                self.ioevents.remove(_IoEvent(fd, addr, length, datamatch, bool(pio)))
            except ValueError:
                raise FakeHvError("unregister_ioevent", errno.ENOENT,
                                  f"{'port' if pio else 'mmio'} {addr:#x}/{length}") from None

    # --- vCPUs and state ---------------------------------------------------------------------------

    def create_vcpu(self, index: int) -> "FakeVcpu":
        with self._lock:
            if not 0 <= index < self._max_vcpus or len(self._vcpus) >= self._max_vcpus:
                raise FakeHvError("create_vcpu", errno.EINVAL, f"vcpu {index}")
            if index in self._vcpus:
                raise FakeHvError("create_vcpu", errno.EEXIST, f"vcpu {index}")
            vcpu = self._vcpus[index] = FakeVcpu(self, index)
            return vcpu

    def clock(self) -> int:
        return time.monotonic_ns() - self._clock_base

    def save_state(self) -> dict[str, Any]:
        with self._lock:
            return {"version": STATE_VERSION, "irqchip": self.has_irqchip,
                    "irq_levels": sorted([g, int(v)] for g, v in self.irq_levels.items()),
                    "clock": self.clock()}

    def restore_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise SnapshotFormatError("fake VM state: missing or unknown version")
        if set(state) != {"version", "irqchip", "irq_levels", "clock"}:
            raise SnapshotFormatError("fake VM state: unexpected or missing fields")
        if state["irqchip"] is not self.has_irqchip:
            raise SnapshotFormatError("fake VM state: irqchip presence does not match this VM")
        levels = state["irq_levels"]
        if not isinstance(levels, list) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p)
                for p in levels):
            raise SnapshotFormatError("fake VM state: invalid irq levels")
        clock = state["clock"]
        if not isinstance(clock, int) or not 0 <= clock < 1 << 64:
            raise SnapshotFormatError("fake VM state: invalid clock")
        with self._lock:
            self.irq_levels = {g: bool(v) for g, v in levels}
            self._clock_base = time.monotonic_ns() - clock

    def close(self) -> None:
        with self._lock:
            for vcpu in self._vcpus.values():
                vcpu.kick()
            self._by_gpa = ()
            for s in self._slots.values():
                s.view.release()
            self._slots.clear()
            self.closed = True


# --- vCPU --------------------------------------------------------------------------------------------


class FakeVcpu:
    def __init__(self, vm: FakeVm, index: int):
        self.index = index
        self._vm = vm
        self.cpu = x86.Cpu(vm)
        self._sregs = Sregs()
        self._sregs.cs = Segment(base=0xFFFF0000, selector=0xF000, type=11)  # x86 reset state
        self.cpu.rip = 0xFFF0
        self._apply_mode()
        self._exit_buf = bytearray(8)
        self._exit_view = memoryview(self._exit_buf)
        self._slices = {n: self._exit_view[:n] for n in (1, 2, 4, 8)}
        # One exit object per kind, refilled on every exit, as the KVM adapter does: an exit is
        # valid until the next run(), and a caller keeping one longer breaks here too.
        self._exits = {x86.EV_OUT: ve.IoOut(0, self._exit_view[:0]), x86.EV_IN: ve.IoIn(0, self._exit_view[:0]),
                       x86.EV_MMIO_W: ve.MmioWrite(0, self._exit_view[:0]),
                       x86.EV_MMIO_R: ve.MmioRead(0, self._exit_view[:0])}
        self._pending: tuple[str, int, int, bool] | None = None  # (kind, reg, size, high)
        self._halted = False
        self._kicked = False
        self._wake = threading.Event()
        self._native_id: int | None = None
        self.setup_config: VcpuSetup | None = None
        self.unhidden_features: tuple[str, ...] = ()  # the fake hides whatever it is asked to

    def setup(self, cfg: VcpuSetup) -> None:
        check_features(cfg.hidden_features)
        self.setup_config = cfg

    def run(self) -> ve.VcpuExit:
        self._native_id = threading.get_native_id()
        cpu = self.cpu
        if self._pending is not None:  # complete IN / MMIO read from the exit data, like KVM
            _kind, reg, size, high = self._pending
            self._pending = None
            cpu.put(reg, size, int.from_bytes(self._exit_view[:size], "little"), high)
        while True:
            if self._kicked:
                return ve.INTERRUPTED
            if self._halted:
                return self._idle()
            ev = cpu.step()
            if ev is None:
                continue
            kind = ev[0]
            exit_ = self._exits.get(kind)
            if exit_ is not None:
                data = exit_.data = self._slices[ev[2]]
                if kind == x86.EV_OUT or kind == x86.EV_MMIO_W:
                    data[:] = ev[3].to_bytes(ev[2], "little")
                else:
                    reg, size, high = ev[3]
                    self._pending = (kind, reg, size, high)
                if kind == x86.EV_OUT or kind == x86.EV_IN:
                    exit_.port = ev[1]
                else:
                    exit_.addr = ev[1]
                return exit_
            if kind == x86.EV_HLT:
                if not self._vm.has_irqchip:
                    return ve.HLT
                self._halted = True  # the in-kernel irqchip would hold it until an interrupt
                continue
            if kind == x86.EV_FETCH_FAULT:
                return ve.InternalError(_INTERNAL_ERROR_EMULATION)
            return self._idle()  # unsupported code: an idle guest

    def _idle(self) -> ve.VcpuExit:
        self._wake.wait()
        return ve.INTERRUPTED

    def kick(self) -> None:
        self._kicked = True
        self._wake.set()

    def clear_kick(self) -> None:
        self._kicked = False
        self._wake.clear()

    def thread_id(self) -> int | None:
        return self._native_id

    # --- registers ---------------------------------------------------------------------------------

    def get_regs(self) -> Regs:
        cpu = self.cpu
        return Regs(**dict(zip(_X86_GPRS, cpu.gpr)), rip=cpu.rip, rflags=cpu.rflags)

    def set_regs(self, regs: Regs) -> None:
        values = [getattr(regs, n) for n in _X86_GPRS] + [regs.rip, regs.rflags]
        if not all(isinstance(v, int) and 0 <= v < 1 << 64 for v in values):
            raise HypervisorError(f"vcpu {self.index}: invalid register value")
        self.cpu.gpr[:] = values[:16]
        self.cpu.rip, self.cpu.rflags = values[16], values[17]

    def get_sregs(self) -> Sregs:
        return _copy_sregs(self._sregs)

    def set_sregs(self, sregs: Sregs) -> None:
        self._sregs = _copy_sregs(sregs)
        self._apply_mode()

    def _apply_mode(self) -> None:
        s = self._sregs
        self.cpu.set_mode(s.cr0, s.efer, s.cs.l, s.cs.db, s.cs.base, s.ds.base)

    # --- state -------------------------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "regs": _as_dict(self.get_regs()),
            "sregs": _as_dict(self._sregs),
            "halted": self._halted,
            "pending": list(self._pending) if self._pending else None,
            "exit_data": bytes(self._exit_buf),
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        what = f"fake vcpu {self.index} state"
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise SnapshotFormatError(f"{what}: missing or unknown version")
        if set(state) != {"version", "regs", "sregs", "halted", "pending", "exit_data"}:
            raise SnapshotFormatError(f"{what}: unexpected or missing fields")
        regs = _dataclass_from(Regs, state["regs"], what)
        sregs = _sregs_from(state["sregs"], what)
        pending = state["pending"]
        if pending is not None:
            if (not isinstance(pending, (list, tuple)) or len(pending) != 4
                    or pending[0] not in (x86.EV_IN, x86.EV_MMIO_R) or pending[1] not in range(16)
                    or pending[2] not in (1, 2, 4, 8) or not isinstance(pending[3], bool)):
                raise SnapshotFormatError(f"{what}: invalid pending access")
            pending = tuple(pending)
        data = state["exit_data"]
        if not isinstance(data, (bytes, bytearray)) or len(data) != len(self._exit_buf):
            raise SnapshotFormatError(f"{what}: invalid exit data")
        if not isinstance(state["halted"], bool):
            raise SnapshotFormatError(f"{what}: invalid halted flag")
        try:
            self.set_regs(regs)
        except HypervisorError as e:
            raise SnapshotFormatError(f"{what}: {e}") from None
        self.set_sregs(sregs)
        self._halted = state["halted"]
        self._pending = pending
        self._exit_buf[:] = data


_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _as_dict(obj) -> dict[str, Any]:
    """dataclasses.asdict for the register records (int fields and nested records, nothing
    else), without its recursion through deepcopy: a vCPU's record is collected inside a
    migration's downtime."""
    cls = obj.__class__
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    out: dict[str, Any] = {}
    for name in names:
        v = getattr(obj, name)
        out[name] = v if v.__class__ is int else _as_dict(v)
    return out


def _copy_sregs(s: Sregs) -> Sregs:
    """A private copy, checked like KVM's fixed-width fields would check it."""
    try:
        return _sregs_from(_as_dict(s), "sregs")
    except SnapshotFormatError as e:
        raise HypervisorError(str(e)) from None


def _dataclass_from(cls, data: Any, what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(data, dict) or set(data) != names:
        raise SnapshotFormatError(f"{what}: invalid {cls.__name__}")
    if not all(isinstance(v, int) and 0 <= v < 1 << 64 for v in data.values()):
        raise SnapshotFormatError(f"{what}: invalid {cls.__name__} value")
    return cls(**data)


def _sregs_from(data: Any, what: str) -> Sregs:
    if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(Sregs)}:
        raise SnapshotFormatError(f"{what}: invalid Sregs")
    kw: dict[str, Any] = {}
    for name, v in data.items():
        if name in ("gdt", "idt"):
            kw[name] = _dataclass_from(DescriptorTable, v, what)
        elif name in _SEGMENTS:
            kw[name] = _dataclass_from(Segment, v, what)
        elif isinstance(v, int) and 0 <= v < 1 << 64:
            kw[name] = v
        else:
            raise SnapshotFormatError(f"{what}: invalid Sregs.{name}")
    return Sregs(**kw)
