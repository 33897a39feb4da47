"""KvmHypervisor: /dev/kvm, its capabilities and what every VM shares (CPUID, MSR list)."""

from __future__ import annotations

import logging
import os
import signal
import threading

from adapters.kvm._lib import ffi, lib
from adapters.kvm.errors import KvmIoctlError, check
from domain.errors import MissingCapabilityError

# Without these the VMM cannot run a guest the way it is built (in-kernel irqchip, PIT,
# eventfd-driven devices, immediate_exit kicks, save/restore of every piece of state).
REQUIRED_CAPS = (
    "KVM_CAP_IRQCHIP", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD", "KVM_CAP_USER_MEMORY",
    "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_SET_IDENTITY_MAP_ADDR", "KVM_CAP_PIT2", "KVM_CAP_PIT_STATE2",
    "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_EXT_CPUID", "KVM_CAP_MP_STATE", "KVM_CAP_ADJUST_CLOCK",
    "KVM_CAP_VCPU_EVENTS", "KVM_CAP_DEBUGREGS", "KVM_CAP_READONLY_MEM",
)

# A real-time signal with a C no-op handler: it only knocks a vCPU thread out of KVM_RUN.
KICK_SIGNAL = signal.SIGRTMIN

log = logging.getLogger("pystrato.kvm")

_MAX_CPUID = 256
_MAX_MSRS = 1024
_handler_lock = threading.Lock()
_handler_installed = False


def install_kick_handler() -> None:
    global _handler_installed
    with _handler_lock:
        if not _handler_installed:
            check(lib.px_install_kick_handler(KICK_SIGNAL), "sigaction")
            _handler_installed = True


class KvmHypervisor:
    kind = "kvm"

    def __init__(self, dev: str = "/dev/kvm"):
        try:
            self._fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmIoctlError(f"open {dev}", e.errno or 0) from None
        try:
            version = check(lib.px_ioctl_int(self._fd, lib.KVM_GET_API_VERSION, 0), "KVM_GET_API_VERSION")
            if version != lib.KVM_API_VERSION:
                raise MissingCapabilityError(f"KVM API version {version}, need {lib.KVM_API_VERSION}")
            for name in REQUIRED_CAPS:
                if self.check_extension(getattr(lib, name)) <= 0:
                    raise MissingCapabilityError(f"KVM lacks the required capability {name}")
            self.vcpu_mmap_size = check(
                lib.px_ioctl_int(self._fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE")
            self.has_xsave = self.check_extension(lib.KVM_CAP_XSAVE) > 0
            self.has_xcrs = self.check_extension(lib.KVM_CAP_XCRS) > 0
            install_kick_handler()
        except BaseException:
            os.close(self._fd)
            raise
        self._cpuid: tuple[tuple[int, ...], ...] | None = None
        self._msr_index: tuple[int, ...] | None = None
        self.saveable_msrs: tuple[int, ...] | None = None  # learned from the first vCPU saved
        self._lock = threading.Lock()
        self._warned: set[tuple[str, ...]] = set()
        self._hypercalls: bool | None = None
        self._probe_lock = threading.Lock()  # the probe's VM calls back into this object

    @property
    def fd(self) -> int:
        return self._fd

    def check_extension(self, cap: int) -> int:
        return check(lib.px_ioctl_int(self._fd, lib.KVM_CHECK_EXTENSION, cap), "KVM_CHECK_EXTENSION")

    def max_vcpus(self) -> int:
        n = self.check_extension(lib.KVM_CAP_MAX_VCPUS)
        return n if n > 0 else self.check_extension(lib.KVM_CAP_NR_VCPUS)

    def supported_cpuid(self) -> tuple[tuple[int, ...], ...]:
        """KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx) tuples."""
        with self._lock:
            if self._cpuid is None:
                buf = ffi.new("struct kvm_cpuid_entry2[]", _MAX_CPUID)
                n = check(lib.px_get_supported_cpuid(self._fd, buf, _MAX_CPUID), "KVM_GET_SUPPORTED_CPUID")
                self._cpuid = tuple(
                    (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in buf[0:n])
            return self._cpuid

    def msr_index_list(self) -> tuple[int, ...]:
        """MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST)."""
        with self._lock:
            if self._msr_index is None:
                buf = ffi.new("uint32_t[]", _MAX_MSRS)
                n = check(lib.px_get_msr_index_list(self._fd, buf, _MAX_MSRS), "KVM_GET_MSR_INDEX_LIST")
                self._msr_index = tuple(buf[0:n])
            return self._msr_index

    def hypercalls_complete(self) -> bool:
        """Whether a guest's VMCALL returns on this host (probed once, with a throw-away VM)."""
        with self._probe_lock:
            if self._hypercalls is None:
                from adapters.kvm.probe import hypercalls_complete

                self._hypercalls = hypercalls_complete(self)
            return self._hypercalls

    def warn_unhidden(self, names: tuple[str, ...]) -> None:
        """Logged once per set of names, not once per vCPU."""
        with self._lock:
            if names in self._warned:
                return
            self._warned.add(names)
        log.warning("KVM keeps these hidden CPU features visible to the guest: %s "
                    "(hide them in the guest, e.g. clearcpuid=)", ",".join(names))

    def create_vm(self):
        from adapters.kvm.vm import KvmVm

        fd = check(lib.px_ioctl_int(self._fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        return KvmVm(self, fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
