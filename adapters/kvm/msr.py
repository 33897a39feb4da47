"""Model-specific registers a vCPU boots with (Firecracker's arch/x86_64/msr.rs boot set).

Architectural MSR numbers from the Intel SDM; they are not in the uapi headers.
"""

from __future__ import annotations

IA32_TSC = 0x10
IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175
IA32_SYSENTER_EIP = 0x176
IA32_MISC_ENABLE = 0x1A0
IA32_MTRR_DEF_TYPE = 0x2FF
STAR = 0xC0000081
LSTAR = 0xC0000082
CSTAR = 0xC0000083
SYSCALL_MASK = 0xC0000084
KERNEL_GS_BASE = 0xC0000102

_MISC_ENABLE_FAST_STRING = 1 << 0
_MTRR_ENABLE = 1 << 11
_MTRR_TYPE_WB = 6

BOOT_MSRS: tuple[tuple[int, int], ...] = (
    (IA32_SYSENTER_CS, 0),
    (IA32_SYSENTER_ESP, 0),
    (IA32_SYSENTER_EIP, 0),
    (STAR, 0),
    (CSTAR, 0),
    (KERNEL_GS_BASE, 0),
    (SYSCALL_MASK, 0),
    (LSTAR, 0),
    (IA32_TSC, 0),
    (IA32_MISC_ENABLE, _MISC_ENABLE_FAST_STRING),
    # Write-back as the default memory type: without it a guest maps all RAM uncached.
    (IA32_MTRR_DEF_TYPE, _MTRR_ENABLE | _MTRR_TYPE_WB),
)
