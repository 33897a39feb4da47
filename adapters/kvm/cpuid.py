"""CPUID presented to a guest: KVM's supported set fixed up per vCPU.

Pure Python over plain entries ``[function, index, flags, eax, ebx, ecx, edx]`` so the rules can be
tested without /dev/kvm. What is fixed up (as Firecracker and Cloud Hypervisor do):
leaf 1 (APIC id, logical count, HTT, hypervisor bit), leaf 4 (cores / threads sharing a cache),
leaves 0xB and 0x1F (x2APIC topology, one set per vCPU), AMD 0x80000008 (core count), and the
feature bits the configuration hides.
"""

from __future__ import annotations

from typing import Iterable

from domain.cpu_state import VcpuSetup
from domain.cpu_features import FEATURES, check_features  # noqa: F401  (re-exported)

FUNCTION, INDEX, FLAGS, EAX, EBX, ECX, EDX = range(7)
_REG = {"eax": EAX, "ebx": EBX, "ecx": ECX, "edx": EDX}

_HTT = 1 << 28  # leaf 1 EDX: more than one logical processor per package
_HYPERVISOR = 1 << 31  # leaf 1 ECX
_TOPOLOGY_LEAVES = (0xB, 0x1F)
_LEVEL_SMT, _LEVEL_CORE = 1, 2


def _bits(count: int) -> int:
    """Width of an APIC-id field able to number ``count`` items."""
    return max(count - 1, 0).bit_length()


def _vendor(entries: list[list[int]]) -> bytes:
    for e in entries:
        if e[FUNCTION] == 0:
            return b"".join(v.to_bytes(4, "little") for v in (e[EBX], e[EDX], e[ECX]))
    return b""


def _find(entries: list[list[int]], function: int, index: int = 0) -> list[int] | None:
    for e in entries:
        if e[FUNCTION] == function and e[INDEX] == index:
            return e
    return None


def normalize(entries: Iterable[Iterable[int]], cfg: VcpuSetup, significant_index: int) -> list[list[int]]:
    """Per-vCPU CPUID from the hypervisor's supported entries (which are not modified).

    ``significant_index`` is KVM's flag marking leaves whose subleaf (ECX) matters.
    """
    check_features(cfg.hidden_features)
    out = [list(e) for e in entries]
    threads = max(cfg.threads_per_core, 1)
    per_package = threads * max(cfg.cores_per_socket, 1)
    thread_bits = _bits(threads)
    package_bits = thread_bits + _bits(max(cfg.cores_per_socket, 1))
    max_basic = (_find(out, 0) or [0, 0, 0, 0])[EAX]

    for e in out:
        fn = e[FUNCTION]
        if fn == 1:
            e[EBX] = (e[EBX] & 0xFFFF) | ((1 << package_bits) & 0xFF) << 16 | (cfg.apic_id & 0xFF) << 24
            e[EDX] = e[EDX] | _HTT if per_package > 1 else e[EDX] & ~_HTT
            e[ECX] |= _HYPERVISOR
        elif fn == 4 and e[EAX] & 0x1F:  # a valid cache descriptor
            level = (e[EAX] >> 5) & 0x7
            sharing = (1 << (package_bits if level >= 3 else thread_bits)) - 1
            cores = (1 << (package_bits - thread_bits)) - 1
            e[EAX] = (e[EAX] & 0x3FFF) | (sharing & 0xFFF) << 14 | (cores & 0x3F) << 26
        elif fn == 0x80000008 and _vendor(out) == b"AuthenticAMD":
            e[ECX] = (e[ECX] & ~0xF0FF) | (per_package - 1) & 0xFF | (package_bits & 0xF) << 12

    present = {e[FUNCTION] for e in out}
    out = [e for e in out if e[FUNCTION] not in _TOPOLOGY_LEAVES]
    for leaf in _TOPOLOGY_LEAVES:
        if leaf in present and leaf <= max_basic:
            out.extend(_topology_leaf(leaf, cfg.apic_id, threads, per_package, thread_bits,
                                      package_bits, significant_index))

    for name in cfg.hidden_features:
        leaf, sub, reg, bit = FEATURES[name]
        e = _find(out, leaf, sub)
        if e is not None:
            e[_REG[reg]] &= ~(1 << bit)
    return out


def _topology_leaf(leaf: int, apic_id: int, threads: int, per_package: int, thread_bits: int,
                   package_bits: int, flag: int) -> list[list[int]]:
    # Subleaf 0: SMT level; 1: core level; 2: terminator (level type 0). EDX = x2APIC id.
    return [
        [leaf, 0, flag, thread_bits, threads, _LEVEL_SMT << 8 | 0, apic_id],
        [leaf, 1, flag, package_bits, per_package, _LEVEL_CORE << 8 | 1, apic_id],
        [leaf, 2, flag, 0, 0, 2, apic_id],
    ]


def visible_features(entries: Iterable[Iterable[int]], names: Iterable[str]) -> tuple[str, ...]:
    """Those of ``names`` whose bit is set in ``entries`` (e.g. what KVM kept after a hide)."""
    table = {(e[FUNCTION], e[INDEX]): e for e in (list(x) for x in entries)}
    out = []
    for name in names:
        leaf, sub, reg, bit = FEATURES[name]
        e = table.get((leaf, sub))
        if e is not None and e[_REG[reg]] >> bit & 1:
            out.append(name)
    return tuple(out)
