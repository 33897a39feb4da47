"""KvmVcpu: KVM_RUN over the mmapped kvm_run area, kicks, CPU setup and state.

run() is the hot path (measured here: ~3 us of Python per exit before tuning, ~1.3 us after,
against ~25 us for the exit itself on this nested host). Everything it needs is bound once: the
C entry point, the exit decoders (struct.Struct over offsets the compiler computed), the
memoryview slices handed out as exit data, and one exit object per kind, refilled on every exit:
an I/O or MMIO exit object and its data are valid until the next run() of the same vCPU, which
is all the kvm_run protocol allows anyway (the data lives in kvm_run).
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import signal
import struct
import threading
from typing import Any

from adapters.kvm import cpuid as cpuid_rules
from adapters.kvm._lib import ffi, lib
from adapters.kvm.convert import regs_from_kvm, regs_to_kvm, sregs_from_kvm, sregs_to_kvm
from adapters.kvm.errors import KvmIoctlError, check
from adapters.kvm.hypervisor import KICK_SIGNAL
from adapters.kvm.msr import BOOT_MSRS
from domain import vcpu_exit as ve
from domain.cpu_features import HYPERCALL_FEATURES
from domain.cpu_state import Regs, Sregs, VcpuSetup
from domain.errors import HypervisorError, SnapshotFormatError

# 2: CPUID and MSRs as the kernel's own arrays (bytes), not lists of ints: a migration
# encodes the vCPU inside its downtime, and ~600 ints took longer than every ioctl together.
# Version 1 states (snapshots of earlier releases) are still read.
STATE_VERSION = 2

_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _fields(*names: str) -> tuple[int, struct.Struct]:
    """(start offset, Struct) reading the named kvm_run fields in offset order, padding between."""
    spans = sorted((getattr(lib, f"PX_RUN_{n}"), getattr(lib, f"PX_SZ_{n}")) for n in names)
    fmt, pos = "<", spans[0][0]
    for off, size in spans:
        fmt += "x" * (off - pos) + _FMT[size]
        pos = off + size
    return spans[0][0], struct.Struct(fmt)


_IO_OFF, _IO = _fields("IO_DIRECTION", "IO_SIZE", "IO_PORT", "IO_COUNT", "IO_DATA_OFFSET")
_MMIO_OFF, _MMIO = _fields("MMIO_PHYS_ADDR", "MMIO_LEN", "MMIO_IS_WRITE")
assert lib.PX_SZ_EXIT_REASON == 4 and lib.PX_RUN_EXIT_REASON % 4 == 0
_EXIT_INDEX = lib.PX_RUN_EXIT_REASON // 4  # exit_reason as an element of the run area cast to u32
_MMIO_MAX = lib.PX_SZ_MMIO_DATA
_FAIL_OFF, _FAIL = _fields("FAIL_ENTRY_REASON")
_INTERNAL_OFF, _INTERNAL = _fields("INTERNAL_SUBERROR")
_SYSEV_OFF, _SYSEV = _fields("SYSTEM_EVENT_TYPE")
_IMMEDIATE_EXIT = lib.PX_RUN_IMMEDIATE_EXIT
_MMIO_DATA = lib.PX_RUN_MMIO_DATA

_SYSTEM_EVENTS = {
    lib.KVM_SYSTEM_EVENT_SHUTDOWN: ve.SystemEvent.SHUTDOWN,
    lib.KVM_SYSTEM_EVENT_RESET: ve.SystemEvent.RESET,
    lib.KVM_SYSTEM_EVENT_CRASH: ve.SystemEvent.CRASH,
}

_APIC_LVT_LINT0 = 0x350  # local APIC register offsets (Intel SDM, APIC register map)
_APIC_LVT_LINT1 = 0x360
_APIC_MODE_NMI = 0x4
_APIC_MODE_EXTINT = 0x7
_FPU_FCW = 0x37F  # x87 and SSE control words at reset (Intel SDM vol. 1, 8.1.5 and 10.2.3)
_FPU_MXCSR = 0x1F80
_MAX_CPUID = 256
_MAX_STATE_MSRS = 4096

# (state key, struct, GET ioctl, SET ioctl, capability attribute on the hypervisor or None)
_BLOBS = (
    ("regs", "struct kvm_regs *", "KVM_GET_REGS", "KVM_SET_REGS", None),
    ("sregs", "struct kvm_sregs *", "KVM_GET_SREGS", "KVM_SET_SREGS", None),
    ("fpu", "struct kvm_fpu *", "KVM_GET_FPU", "KVM_SET_FPU", None),
    ("xsave", "struct kvm_xsave *", "KVM_GET_XSAVE", "KVM_SET_XSAVE", "has_xsave"),
    ("xcrs", "struct kvm_xcrs *", "KVM_GET_XCRS", "KVM_SET_XCRS", "has_xcrs"),
    ("debugregs", "struct kvm_debugregs *", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", None),
    ("lapic", "struct kvm_lapic_state *", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "irqchip"),
    ("vcpu_events", "struct kvm_vcpu_events *", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", None),
)
_STATE_KEYS = {
    1: frozenset({"version", "cpuid", "mp_state", "msrs"} | {b[0] for b in _BLOBS}),
    2: frozenset({"version", "cpuid", "mp_state", "msr_indices", "msr_values"} | {b[0] for b in _BLOBS}),
}
_CPUID_ENTRY_SIZE = ffi.sizeof("struct kvm_cpuid_entry2")


class KvmVcpu:
    def __init__(self, vm, index: int, fd: int):
        self.index = index
        self._vm = vm
        self._hv = vm.hypervisor
        self._fd = fd
        self._run_map = mmap.mmap(fd, self._hv.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._run_map)
        self._u32 = self._view.cast("I")
        self._slices: dict[tuple[int, int], memoryview] = {}
        # KVM puts PIO data at one fixed offset: views by length for it, found on first exit.
        self._pio_offset = -1
        self._pio_data: dict[int, memoryview] = {}
        self._mmio_data = [self._view[_MMIO_DATA : _MMIO_DATA + n] for n in range(_MMIO_MAX + 1)]
        empty = self._mmio_data[0]
        self._io_in, self._io_out = _IoIn(0, empty), _IoOut(0, empty)
        self._mmio_read, self._mmio_write = _MmioRead(0, empty), _MmioWrite(0, empty)
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self._native_id: int | None = None
        self._regs = ffi.new("struct kvm_regs *")
        self._sregs = ffi.new("struct kvm_sregs *")
        self.unhidden_features: tuple[str, ...] = ()  # hidden by setup() but kept by KVM

    # --- the hot path ------------------------------------------------------------------------------

    def run(self) -> ve.VcpuExit:
        if _get_ident() != self._ident:
            self._note_thread()
        rc = _px_run(self._fd)
        while rc == _NEG_EAGAIN:
            # An AP waiting for SIPI (mp_state UNINITIALIZED/INIT_RECEIVED) returns EAGAIN from
            # KVM_RUN once an INIT/SIPI changed its state: KVM expects userspace to re-enter.
            rc = _px_run(self._fd)
        if rc < 0:
            if rc == _NEG_EINTR:
                return _INTERRUPTED
            raise KvmIoctlError("KVM_RUN", -rc, f"vcpu {self.index}")
        reason = self._u32[_EXIT_INDEX]
        if reason == _EXIT_IO:
            direction, size, port, count, offset = _IO_unpack(self._run_map, _IO_OFF)
            n = size * count
            data = self._pio_data.get(n) if offset == self._pio_offset else None
            if data is None:
                data = self._io_slice(offset, n)
            exit_ = self._io_out if direction == _IO_OUT else self._io_in
            exit_.port = port
            exit_.data = data
            return exit_
        if reason == _EXIT_MMIO:
            addr, length, is_write = _MMIO_unpack(self._run_map, _MMIO_OFF)
            exit_ = self._mmio_write if is_write else self._mmio_read
            exit_.addr = addr
            exit_.data = self._mmio_data[length] if length <= _MMIO_MAX else self._bad_mmio(length)
            return exit_
        return self._slow_exit(reason)

    def _note_thread(self) -> None:
        self._thread = threading.current_thread()
        self._native_id = threading.get_native_id()
        self._ident = threading.get_ident()

    def _io_slice(self, offset: int, length: int) -> memoryview:
        if self._pio_offset < 0:
            self._pio_offset = offset
        view = self._slices.get((offset, length))
        if view is None:
            if offset + length > len(self._view):
                raise HypervisorError(f"vcpu {self.index}: exit data outside the run area")
            view = self._slices[(offset, length)] = self._view[offset : offset + length]
        if offset == self._pio_offset:
            self._pio_data[length] = view
        return view

    def _bad_mmio(self, length: int):
        raise HypervisorError(f"vcpu {self.index}: MMIO exit of {length} bytes")

    def _slow_exit(self, reason: int) -> ve.VcpuExit:
        run = self._run_map
        if reason == lib.KVM_EXIT_HLT:
            return ve.HLT
        if reason == lib.KVM_EXIT_INTR:
            return _INTERRUPTED
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return ve.SHUTDOWN
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = _SYSEV.unpack_from(run, _SYSEV_OFF)[0]
            return ve.SystemEvent(_SYSTEM_EVENTS.get(kind, kind))
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return ve.FailEntry(_FAIL.unpack_from(run, _FAIL_OFF)[0])
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            return ve.InternalError(_INTERNAL.unpack_from(run, _INTERNAL_OFF)[0])
        raise HypervisorError(f"vcpu {self.index}: unexpected KVM exit reason {reason}")

    def kick(self) -> None:
        # immediate_exit covers a kick that lands before KVM_RUN; the signal one that lands
        # inside it. Both end in EINTR, both are needed.
        self._run_map[_IMMEDIATE_EXIT] = 1
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def clear_kick(self) -> None:
        self._run_map[_IMMEDIATE_EXIT] = 0

    def thread_id(self) -> int | None:
        return self._native_id

    # --- registers ---------------------------------------------------------------------------------

    def get_regs(self) -> Regs:
        self._ioctl("KVM_GET_REGS", self._regs)
        return regs_from_kvm(self._regs)

    def set_regs(self, regs: Regs) -> None:
        try:
            regs_to_kvm(regs, self._regs)
        except (OverflowError, TypeError) as e:
            raise HypervisorError(f"vcpu {self.index}: invalid register value: {e}") from None
        self._ioctl("KVM_SET_REGS", self._regs)

    def get_sregs(self) -> Sregs:
        self._ioctl("KVM_GET_SREGS", self._sregs)
        return sregs_from_kvm(self._sregs)

    def set_sregs(self, sregs: Sregs) -> None:
        self._ioctl("KVM_GET_SREGS", self._sregs)  # keeps the pending-interrupt bitmap
        try:
            sregs_to_kvm(sregs, self._sregs)
        except (OverflowError, TypeError) as e:
            raise HypervisorError(f"vcpu {self.index}: invalid segment register value: {e}") from None
        self._ioctl("KVM_SET_SREGS", self._sregs)

    # --- boot setup --------------------------------------------------------------------------------

    def setup(self, cfg: VcpuSetup) -> None:
        if cfg.nr_vcpus > 1 and not self._hv.hypercalls_complete():
            # An SMP guest would wait forever in its first PV IPI or spinlock kick.
            extra = tuple(n for n in HYPERCALL_FEATURES if n not in cfg.hidden_features)
            cfg = dataclasses.replace(cfg, hidden_features=cfg.hidden_features + extra)
        entries = cpuid_rules.normalize(self._hv.supported_cpuid(), cfg, lib.KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
        self.set_cpuid(entries)
        # Some hosts (kvm-pvm) put host bits back into leaves 1, 7 and 0xD: say which hidden
        # features the guest still sees, so its kernel can be told (clearcpuid=).
        self.unhidden_features = cpuid_rules.visible_features(self.get_cpuid(), cfg.hidden_features)
        if self.unhidden_features:
            self._hv.warn_unhidden(self.unhidden_features)
        self.set_msrs(BOOT_MSRS)
        fpu = ffi.new("struct kvm_fpu *")
        fpu.fcw, fpu.mxcsr = _FPU_FCW, _FPU_MXCSR
        self._ioctl("KVM_SET_FPU", fpu)
        if self._vm.has_irqchip:
            lapic = ffi.new("struct kvm_lapic_state *")
            self._ioctl("KVM_GET_LAPIC", lapic)
            regs = ffi.buffer(lapic)
            for off, mode in ((_APIC_LVT_LINT0, _APIC_MODE_EXTINT), (_APIC_LVT_LINT1, _APIC_MODE_NMI)):
                lvt = int.from_bytes(regs[off : off + 4], "little")
                regs[off : off + 4] = ((lvt & ~0x700) | mode << 8).to_bytes(4, "little")
            self._ioctl("KVM_SET_LAPIC", lapic)

    def tsc_khz(self) -> int:
        """The guest's TSC frequency (KVM_GET_TSC_KHZ): turns guest rdtsc deltas into time."""
        return check(lib.px_ioctl_int(self._fd, lib.KVM_GET_TSC_KHZ, 0), "KVM_GET_TSC_KHZ", f"vcpu {self.index}")

    def get_cpuid(self) -> list[list[int]]:
        buf = ffi.new("struct kvm_cpuid_entry2[]", _MAX_CPUID)
        n = check(lib.px_get_cpuid2(self._fd, buf, _MAX_CPUID), "KVM_GET_CPUID2", f"vcpu {self.index}")
        return [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in buf[0:n]]

    def set_cpuid(self, entries: list[list[int]]) -> None:
        buf = ffi.new("struct kvm_cpuid_entry2[]", max(len(entries), 1))
        for dst, (fn, idx, flags, eax, ebx, ecx, edx) in zip(buf, entries):
            dst.function, dst.index, dst.flags = fn, idx, flags
            dst.eax, dst.ebx, dst.ecx, dst.edx = eax, ebx, ecx, edx
        check(lib.px_set_cpuid2(self._fd, buf, len(entries)), "KVM_SET_CPUID2", f"vcpu {self.index}")

    def get_msrs(self, indices) -> list[tuple[int, int]]:
        """Reads MSRs; stops at the first one KVM refuses (KVM_GET_MSRS answers a count)."""
        idx = ffi.new("uint32_t[]", list(indices))
        val = ffi.new("uint64_t[]", len(idx))
        n = check(lib.px_get_msrs(self._fd, idx, val, len(idx)), "KVM_GET_MSRS", f"vcpu {self.index}")
        return [(idx[i], val[i]) for i in range(n)]

    def set_msrs(self, msrs) -> None:
        msrs = list(msrs)
        idx = ffi.new("uint32_t[]", [m[0] for m in msrs])
        val = ffi.new("uint64_t[]", [m[1] for m in msrs])
        n = check(lib.px_set_msrs(self._fd, idx, val, len(msrs)), "KVM_SET_MSRS", f"vcpu {self.index}")
        if n != len(msrs):
            raise KvmIoctlError("KVM_SET_MSRS", errno.EINVAL,
                                f"vcpu {self.index}: MSR {msrs[n][0]:#x} refused")

    def _saveable_msrs(self) -> tuple[int, ...]:
        """The hypervisor's MSR list minus those this host refuses to read, learned once."""
        known = self._hv.saveable_msrs
        if known is None:
            wanted = list(dict.fromkeys(self._hv.msr_index_list() + tuple(m for m, _ in BOOT_MSRS)))
            good: list[int] = []
            while wanted:
                got = self.get_msrs(wanted)
                good.extend(i for i, _ in got)
                wanted = wanted[len(got) + 1 :]  # skip the one that stopped KVM
            known = self._hv.saveable_msrs = tuple(good)
        return known

    # --- state -------------------------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        cpuid = ffi.new("struct kvm_cpuid_entry2[]", _MAX_CPUID)
        n = check(lib.px_get_cpuid2(self._fd, cpuid, _MAX_CPUID), "KVM_GET_CPUID2", f"vcpu {self.index}")
        state: dict[str, Any] = {"version": STATE_VERSION,
                                 "cpuid": bytes(ffi.buffer(cpuid, n * _CPUID_ENTRY_SIZE))}
        for key, ctype, get, _set, cap in _BLOBS:
            if not self._has(cap):
                state[key] = None
                continue
            obj = ffi.new(ctype)
            self._ioctl(get, obj)
            state[key] = bytes(ffi.buffer(obj))
        mp = ffi.new("struct kvm_mp_state *")
        self._ioctl("KVM_GET_MP_STATE", mp)
        state["mp_state"] = int(mp.mp_state)
        indices = self._saveable_msrs()
        idx = ffi.new("uint32_t[]", indices)
        val = ffi.new("uint64_t[]", len(indices))
        n = check(lib.px_get_msrs(self._fd, idx, val, len(indices)), "KVM_GET_MSRS", f"vcpu {self.index}")
        if n != len(indices):
            raise KvmIoctlError("KVM_GET_MSRS", errno.EINVAL,
                                f"vcpu {self.index}: MSR {indices[n]:#x} unreadable")
        state["msr_indices"] = bytes(ffi.buffer(idx))
        state["msr_values"] = bytes(ffi.buffer(val))
        return state

    def restore_state(self, state: dict[str, Any]) -> None:
        blobs, msrs = self._validate(state)
        if state["version"] == 1:
            if state["cpuid"]:
                self.set_cpuid(state["cpuid"])
        elif state["cpuid"]:
            n = len(state["cpuid"]) // _CPUID_ENTRY_SIZE
            cpuid = ffi.new("struct kvm_cpuid_entry2[]", n)
            ffi.buffer(cpuid)[:] = state["cpuid"]
            check(lib.px_set_cpuid2(self._fd, cpuid, n), "KVM_SET_CPUID2", f"vcpu {self.index}")
        mp = ffi.new("struct kvm_mp_state *")
        mp.mp_state = state["mp_state"]
        # Firecracker's order: MSRs after the LAPIC (TSC deadline), events last.
        self._ioctl("KVM_SET_MP_STATE", mp)
        for key in ("regs", "sregs", "fpu", "xsave", "xcrs", "debugregs", "lapic"):
            if key in blobs:
                self._ioctl(blobs[key][0], blobs[key][1])
        self._restore_msrs(msrs)
        self._ioctl(blobs["vcpu_events"][0], blobs["vcpu_events"][1])

    def _restore_msrs(self, msrs: list) -> None:
        """Like set_msrs, but an MSR KVM refuses to write is fine when it already holds the
        saved value (this host reads MSR_KVM_POLL_CONTROL but refuses host writes to it)."""
        remaining = [tuple(m) for m in msrs]
        while remaining:
            idx = ffi.new("uint32_t[]", [m[0] for m in remaining])
            val = ffi.new("uint64_t[]", [m[1] for m in remaining])
            n = check(lib.px_set_msrs(self._fd, idx, val, len(remaining)), "KVM_SET_MSRS", f"vcpu {self.index}")
            if n == len(remaining):
                return
            index, value = remaining[n]
            if self.get_msrs([index]) != [(index, value)]:
                raise KvmIoctlError("KVM_SET_MSRS", errno.EINVAL,
                                    f"vcpu {self.index}: MSR {index:#x} refused value {value:#x}")
            remaining = remaining[n + 1 :]

    def _validate(self, state: Any) -> tuple[dict[str, tuple[str, Any]], list[tuple[int, int]]]:
        """(the blobs to set by key, the MSRs as (index, value)); SnapshotFormatError else."""
        version = state.get("version") if isinstance(state, dict) else None
        if type(version) is not int or version not in _STATE_KEYS:
            raise SnapshotFormatError(f"vcpu {self.index} state: missing or unknown version")
        if set(state) != _STATE_KEYS[version]:
            raise SnapshotFormatError(f"vcpu {self.index} state: unexpected or missing fields")
        blobs = {}
        for key, ctype, _get, set_, cap in _BLOBS:
            blob = state[key]
            if blob is None and (cap is not None):
                continue  # optional on the source: keep this vCPU's own value
            obj = ffi.new(ctype)
            if not isinstance(blob, (bytes, bytearray)) or len(blob) != ffi.sizeof(obj[0]):
                raise SnapshotFormatError(f"vcpu {self.index} state: {key} has the wrong size")
            ffi.buffer(obj)[:] = blob
            blobs[key] = (set_, obj)
        if "lapic" in blobs and not self._vm.has_irqchip:
            raise SnapshotFormatError(f"vcpu {self.index} state: LAPIC state but no irqchip")
        what = f"vcpu {self.index} state"
        if version == 1:
            _check_table(state["cpuid"], 7, 32, _MAX_CPUID, f"{what}: cpuid")
            _check_table(state["msrs"], 2, 64, _MAX_STATE_MSRS, f"{what}: msrs")
            if any(m[0] >= 1 << 32 for m in state["msrs"]):
                raise SnapshotFormatError(f"{what}: MSR index out of range")
            msrs = [(i, v) for i, v in state["msrs"]]
        else:
            cpuid, indices, values = state["cpuid"], state["msr_indices"], state["msr_values"]
            if (not isinstance(cpuid, bytes) or len(cpuid) % _CPUID_ENTRY_SIZE
                    or len(cpuid) > _MAX_CPUID * _CPUID_ENTRY_SIZE):
                raise SnapshotFormatError(f"{what}: cpuid is not an array of at most {_MAX_CPUID} entries")
            if (not isinstance(indices, bytes) or not isinstance(values, bytes) or len(indices) % 4
                    or len(values) != 2 * len(indices) or len(indices) > 4 * _MAX_STATE_MSRS):
                raise SnapshotFormatError(f"{what}: msr_indices and msr_values are not matching arrays")
            msrs = list(zip(struct.unpack(f"<{len(indices) // 4}I", indices),
                            struct.unpack(f"<{len(values) // 8}Q", values)))
        if not isinstance(state["mp_state"], int) or not 0 <= state["mp_state"] < 1 << 32:
            raise SnapshotFormatError(f"vcpu {self.index} state: invalid mp_state")
        return blobs, msrs

    def _has(self, cap: str | None) -> bool:
        if cap is None:
            return True
        if cap == "irqchip":
            return self._vm.has_irqchip
        return bool(getattr(self._hv, cap))

    def _ioctl(self, name: str, arg) -> None:
        check(lib.px_ioctl_ptr(self._fd, getattr(lib, name), arg), name, f"vcpu {self.index}")

    def close(self) -> None:
        if self._fd < 0:
            return
        for exit_ in (self._io_in, self._io_out, self._mmio_read, self._mmio_write):
            exit_.data = None
        for view in [*self._slices.values(), *self._mmio_data, self._u32]:
            view.release()
        self._slices.clear()
        self._pio_data.clear()
        self._view.release()
        try:
            self._run_map.close()
        except BufferError:
            pass  # an exit's data view is still held by a caller; the GC unmaps it later
        os.close(self._fd)
        self._fd = -1


def _check_table(rows: Any, width: int, bits: int, limit: int, what: str) -> None:
    if not isinstance(rows, list) or len(rows) > limit:
        raise SnapshotFormatError(f"{what}: not a list of at most {limit} rows")
    for row in rows:
        if (not isinstance(row, (list, tuple)) or len(row) != width
                or not all(isinstance(v, int) and 0 <= v < 1 << bits for v in row)):
            raise SnapshotFormatError(f"{what}: invalid row")


_px_run = lib.px_run
_NEG_EINTR = -errno.EINTR
_NEG_EAGAIN = -errno.EAGAIN
_INTERRUPTED = ve.INTERRUPTED
_EXIT_IO = lib.KVM_EXIT_IO
_EXIT_MMIO = lib.KVM_EXIT_MMIO
_IO_OUT = lib.KVM_EXIT_IO_OUT
_IoIn, _IoOut, _MmioRead, _MmioWrite = ve.IoIn, ve.IoOut, ve.MmioRead, ve.MmioWrite
_get_ident = threading.get_ident
_IO_unpack = _IO.unpack_from
_MMIO_unpack = _MMIO.unpack_from
