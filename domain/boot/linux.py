"""Direct Linux boot: load kernel and initrd, write the boot structures, return the BSP state."""

from __future__ import annotations

from collections.abc import Sequence

from domain.boot import layout
from domain.boot.cpu import setup_boot_cpu
from domain.boot.errors import BootError
from domain.boot.loader import KernelInfo, load_kernel
from domain.boot.mptable import setup_mptable
from domain.boot.params import load_initrd, write_boot_params, write_cmdline
from domain.cpu_state import Regs, Sregs
from domain.memory import GuestMemory
from domain.record import record


@record(frozen=True)
class BootInfo:
    kernel: KernelInfo
    regs: Regs
    sregs: Sregs
    initrd: tuple[int, int] | None  # (gpa, size)


BZIMAGE_ENTRY_32 = "32"
BZIMAGE_ENTRY_64 = "64"


def boot_linux(mem: GuestMemory, kernel_bytes, initrd_bytes, cmdline: str | bytes,
               nr_vcpus: int, max_vcpus: int | None = None, *,
               bzimage_entry: str = BZIMAGE_ENTRY_32, reserved: Sequence[tuple[int, int]] = ()) -> BootInfo:
    """Everything setup_linux_boot does, also returning where things went.

    A bzImage is entered at its 32-bit protocol entry in flat protected mode by default (where
    QEMU's loader ends up after the real-mode setup code), or with bzimage_entry="64" at its
    64-bit entry (load address + 0x200). An ELF vmlinux is always entered in 64-bit mode at
    e_entry. ``reserved``: (addr, size) windows of the machine that e820 marks reserved (q35's ECAM).
    Why 32 by default: from the 32-bit entry the decompressor builds its 4 GiB identity map
    before it enables paging and keeps it; from the 64-bit one it starts a sparse map and takes
    a page fault for every other range it touches, which kvm-pvm makes expensive. Measured on
    this project's host with scripts/build-guest's LZ4 bzImage, exec to the first serial output:
    35.7-35.9 s (32), 40.9-41.3 s (64), QEMU 37.1 s; both boot to userspace."""
    if bzimage_entry not in (BZIMAGE_ENTRY_32, BZIMAGE_ENTRY_64):
        raise ValueError(f"bzimage_entry must be '32' or '64', not {bzimage_entry!r}")
    if not mem.contains(0, layout.HIMEM_START):
        raise BootError("guest RAM must cover the first MiB", "-m")
    kernel = load_kernel(mem, kernel_bytes)
    cmdline_len = write_cmdline(mem, kernel, cmdline)
    initrd = None
    if initrd_bytes is not None and len(initrd_bytes):
        initrd = load_initrd(mem, kernel, initrd_bytes)
    write_boot_params(mem, kernel, cmdline_len, initrd, reserved)
    setup_mptable(mem, nr_vcpus, max_vcpus)
    if kernel.is_bzimage and bzimage_entry == BZIMAGE_ENTRY_32:
        regs, sregs = setup_boot_cpu(mem, kernel.entry_32, protected_32=True)
    else:
        regs, sregs = setup_boot_cpu(mem, kernel.entry)
    return BootInfo(kernel, regs, sregs, initrd)


def setup_linux_boot(mem: GuestMemory, kernel_bytes, initrd_bytes, cmdline: str | bytes,
                     nr_vcpus: int, max_vcpus: int | None = None, *,
                     bzimage_entry: str = BZIMAGE_ENTRY_32,
                     reserved: Sequence[tuple[int, int]] = ()) -> tuple[Regs, Sregs]:
    """Load a bzImage or ELF vmlinux (+ optional initrd) and return the BSP's (Regs, Sregs)."""
    info = boot_linux(mem, kernel_bytes, initrd_bytes, cmdline, nr_vcpus, max_vcpus,
                      bzimage_entry=bzimage_entry, reserved=reserved)
    return info.regs, info.sregs
