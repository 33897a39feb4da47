"""CPUID feature names a user may hide from the guest (-cpu host,-NAME), and where each lives.

Pure data shared by the command line, the KVM adapter and the test hypervisor.
"""

from __future__ import annotations

from typing import Iterable

from domain.errors import HypervisorError

# name -> (leaf, subleaf, register, bit); names as Linux prints them in /proc/cpuinfo, which is
# also what the kernel's clearcpuid= takes.
FEATURES: dict[str, tuple[int, int, str, int]] = {
    # leaf 1 ECX
    "sse3": (1, 0, "ecx", 0), "pclmulqdq": (1, 0, "ecx", 1), "monitor": (1, 0, "ecx", 3),
    "vmx": (1, 0, "ecx", 5), "ssse3": (1, 0, "ecx", 9), "fma": (1, 0, "ecx", 12),
    "cx16": (1, 0, "ecx", 13), "pdcm": (1, 0, "ecx", 15), "pcid": (1, 0, "ecx", 17),
    "sse4_1": (1, 0, "ecx", 19), "sse4_2": (1, 0, "ecx", 20), "x2apic": (1, 0, "ecx", 21),
    "movbe": (1, 0, "ecx", 22), "popcnt": (1, 0, "ecx", 23), "tsc_deadline_timer": (1, 0, "ecx", 24),
    "aes": (1, 0, "ecx", 25), "xsave": (1, 0, "ecx", 26), "avx": (1, 0, "ecx", 28),
    "f16c": (1, 0, "ecx", 29), "rdrand": (1, 0, "ecx", 30),
    # leaf 1 EDX
    "mtrr": (1, 0, "edx", 12), "pat": (1, 0, "edx", 16), "clflush": (1, 0, "edx", 19),
    "sse": (1, 0, "edx", 25), "sse2": (1, 0, "edx", 26),
    # leaf 7.0 EBX
    "fsgsbase": (7, 0, "ebx", 0), "tsc_adjust": (7, 0, "ebx", 1), "bmi1": (7, 0, "ebx", 3),
    "hle": (7, 0, "ebx", 4), "avx2": (7, 0, "ebx", 5), "smep": (7, 0, "ebx", 7),
    "bmi2": (7, 0, "ebx", 8), "erms": (7, 0, "ebx", 9), "invpcid": (7, 0, "ebx", 10),
    "rtm": (7, 0, "ebx", 11), "mpx": (7, 0, "ebx", 14), "avx512f": (7, 0, "ebx", 16),
    "avx512dq": (7, 0, "ebx", 17), "rdseed": (7, 0, "ebx", 18), "adx": (7, 0, "ebx", 19),
    "smap": (7, 0, "ebx", 20), "avx512ifma": (7, 0, "ebx", 21), "clflushopt": (7, 0, "ebx", 23),
    "clwb": (7, 0, "ebx", 24), "avx512cd": (7, 0, "ebx", 28), "sha_ni": (7, 0, "ebx", 29),
    "avx512bw": (7, 0, "ebx", 30), "avx512vl": (7, 0, "ebx", 31),
    # leaf 7.0 ECX
    "avx512vbmi": (7, 0, "ecx", 1), "umip": (7, 0, "ecx", 2), "pku": (7, 0, "ecx", 3),
    "waitpkg": (7, 0, "ecx", 5), "avx512_vbmi2": (7, 0, "ecx", 6), "gfni": (7, 0, "ecx", 8),
    "vaes": (7, 0, "ecx", 9), "vpclmulqdq": (7, 0, "ecx", 10), "avx512_vnni": (7, 0, "ecx", 11),
    "avx512_bitalg": (7, 0, "ecx", 12), "avx512_vpopcntdq": (7, 0, "ecx", 14),
    "la57": (7, 0, "ecx", 16), "rdpid": (7, 0, "ecx", 22), "movdiri": (7, 0, "ecx", 27),
    "movdir64b": (7, 0, "ecx", 28),
    # leaf 7.0 EDX
    "md_clear": (7, 0, "edx", 10), "serialize": (7, 0, "edx", 14), "spec_ctrl": (7, 0, "edx", 26),
    "flush_l1d": (7, 0, "edx", 28), "arch_capabilities": (7, 0, "edx", 29), "ssbd": (7, 0, "edx", 31),
    # leaf 0xD.1 EAX
    "xsaveopt": (0xD, 1, "eax", 0), "xsavec": (0xD, 1, "eax", 1), "xgetbv1": (0xD, 1, "eax", 2),
    "xsaves": (0xD, 1, "eax", 3),
    # leaf 0x80000001
    "lahf_lm": (0x80000001, 0, "ecx", 0), "abm": (0x80000001, 0, "ecx", 5),
    "sse4a": (0x80000001, 0, "ecx", 6), "3dnowprefetch": (0x80000001, 0, "ecx", 8),
    "topoext": (0x80000001, 0, "ecx", 22), "nx": (0x80000001, 0, "edx", 20),
    "pdpe1gb": (0x80000001, 0, "edx", 26), "rdtscp": (0x80000001, 0, "edx", 27),
    # KVM paravirtual features, leaf 0x40000001 EAX (QEMU's names; Linux does not print these)
    "kvm-pv-unhalt": (0x40000001, 0, "eax", 7), "kvm-pv-ipi": (0x40000001, 0, "eax", 11),
    "kvm-pv-sched-yield": (0x40000001, 0, "eax", 13),
}

# KVM paravirtual features a guest reaches through hypercalls (VMCALL): PV spinlock kicks
# (KVM_HC_KICK_CPU), PV IPIs (KVM_HC_SEND_IPI) and directed yield (KVM_HC_SCHED_YIELD). Linux
# uses them only with more than one possible CPU; a host whose hypercalls do not return must
# not offer them (adapters/kvm/probe.py).
HYPERCALL_FEATURES = ("kvm-pv-unhalt", "kvm-pv-ipi", "kvm-pv-sched-yield")


def check_features(names: Iterable[str]) -> None:
    unknown = sorted(n for n in names if n not in FEATURES)
    if unknown:
        raise HypervisorError(f"unknown CPU feature(s) to hide: {', '.join(unknown)}")
