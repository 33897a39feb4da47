"""KVM only: what setup() presents to the guest (seen by guest code) and the adapter's errors."""

from __future__ import annotations

import errno
import os

import pytest

from domain.cpu_state import VcpuSetup
from domain.errors import HypervisorError
from domain.vcpu_exit import Hlt, IoOut
from tests.contract import asm
from tests.contract.asm import EAX, ECX
from tests.contract.conftest import Machine

pytestmark = pytest.mark.kvm

CPUID = b"\x0f\xa2"
MOV_EAX_EBX, MOV_EAX_ECX, MOV_EAX_EDX = b"\x89\xd8", b"\x89\xc8", b"\x89\xd0"


def cpuid_program(*queries: tuple[int, int, bytes]) -> bytes:
    """For each (leaf, subleaf, mov eax,<reg>): cpuid, then out 0x500 of that register."""
    code = b""
    for leaf, sub, mov in queries:
        code += (asm.mov_r32(EAX, leaf) + asm.mov_r32(ECX, sub) + CPUID + mov
                 + asm.mov_dx(0x500) + asm.out_dx_eax())
    return code + asm.HLT


def guest_cpuid(m: Machine, *queries) -> list[int]:
    m.load(cpuid_program(*queries))
    values = []
    for _ in queries:
        exit_ = m.vcpu.run()
        assert type(exit_) is IoOut
        values.append(int.from_bytes(exit_.data, "little"))
    assert type(m.vcpu.run()) is Hlt
    return values


def test_guest_sees_topology_identity_and_hidden_features(kvm):
    hidden = ("popcnt", "x2apic", "avx2", "cx16")
    m = Machine(kvm)
    try:
        m.vcpu.setup(VcpuSetup(index=0, apic_id=3, nr_vcpus=4, threads_per_core=2, cores_per_socket=2,
                               hidden_features=hidden))
        l1_ebx, l1_ecx, b1_edx, b1_ebx, b0_ebx, l7_ebx = guest_cpuid(
            m, (1, 0, MOV_EAX_EBX), (1, 0, MOV_EAX_ECX), (0xB, 1, MOV_EAX_EDX), (0xB, 1, MOV_EAX_EBX),
            (0xB, 0, MOV_EAX_EBX), (7, 0, MOV_EAX_EBX))
        unhidden = m.vcpu.unhidden_features
    finally:
        m.close()
    assert l1_ebx >> 24 == 3  # initial APIC id
    assert (l1_ebx >> 16) & 0xFF == 4  # logical processors per package
    assert l1_ecx & 1 << 31  # hypervisor present
    assert b1_edx == 3 and b1_ebx == 4 and b0_ebx == 2  # x2APIC id, per package, per core
    # What the guest sees of the hidden features is exactly what setup() reported as kept.
    seen = {"popcnt": l1_ecx >> 23 & 1, "x2apic": l1_ecx >> 21 & 1, "cx16": l1_ecx >> 13 & 1,
            "avx2": l7_ebx >> 5 & 1}
    assert {name for name, bit in seen.items() if bit} == set(unhidden)
    assert "x2apic" not in unhidden  # KVM always honours this one


def test_setup_loads_boot_msrs_fpu_and_lint_pins(kvm):
    from adapters.kvm._lib import ffi
    from adapters.kvm.msr import IA32_MISC_ENABLE, IA32_MTRR_DEF_TYPE

    m = Machine(kvm, irqchip=True)
    try:
        m.vcpu.setup(VcpuSetup(index=0, apic_id=0, nr_vcpus=1))
        msrs = dict(m.vcpu.get_msrs([IA32_MISC_ENABLE, IA32_MTRR_DEF_TYPE]))
        state = m.vcpu.save_state()
    finally:
        m.close()
    assert msrs[IA32_MISC_ENABLE] & 1 and msrs[IA32_MTRR_DEF_TYPE] == 0x806
    fpu = ffi.new("struct kvm_fpu *")
    ffi.buffer(fpu)[:] = state["fpu"]
    assert fpu.fcw == 0x37F  # KVM_GET_FPU does not report MXCSR: read it from the XSAVE area
    if state["xsave"] is not None:
        assert int.from_bytes(state["xsave"][24:28], "little") == 0x1F80
    lapic = state["lapic"]
    lint0, lint1 = (int.from_bytes(lapic[off : off + 4], "little") for off in (0x350, 0x360))
    assert (lint0 >> 8) & 7 == 7 and (lint1 >> 8) & 7 == 4  # ExtINT, NMI


def test_errors_name_the_operation_and_errno(kvm):
    from adapters.kvm.errors import KvmIoctlError
    from adapters.kvm.hypervisor import KvmHypervisor

    with pytest.raises(KvmIoctlError) as info:
        KvmHypervisor(dev="/nonexistent/kvm")
    assert info.value.errno == errno.ENOENT and isinstance(info.value, HypervisorError)
    assert "/nonexistent/kvm" in str(info.value) and "ENOENT" in str(info.value)
    vm = kvm.create_vm()
    try:
        vm.create_vcpu(0)
        with pytest.raises(KvmIoctlError, match=r"KVM_CREATE_VCPU failed: .*EEXIST.*vcpu 0"):
            vm.create_vcpu(0)
    finally:
        vm.close()


def test_supported_cpuid_and_msr_list(kvm):
    leaves = {e[0] for e in kvm.supported_cpuid()}
    assert {0, 1, 0x40000000} <= leaves
    assert 0x10 in kvm.msr_index_list()  # IA32_TSC


def test_tsc_khz_is_the_host_rate_the_guest_counts_at(kvm):
    # bench/kvm_devices.py turns the guest's rdtsc deltas into seconds with it
    m = Machine(kvm, irqchip=True)
    try:
        khz = m.vcpu.tsc_khz()
    finally:
        m.close()
    assert 100_000 <= khz <= 10_000_000  # 0.1 to 10 GHz


def test_a_missing_capability_is_named(kvm, monkeypatch):
    from adapters.kvm._lib import lib
    from adapters.kvm.hypervisor import KvmHypervisor
    from domain.errors import MissingCapabilityError

    real = KvmHypervisor.check_extension
    monkeypatch.setattr(KvmHypervisor, "check_extension",
                        lambda self, cap: 0 if cap == lib.KVM_CAP_IOEVENTFD else real(self, cap))
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(MissingCapabilityError, match="KVM_CAP_IOEVENTFD") as info:
        KvmHypervisor()
    assert info.value.qmp_class == "KVMMissingCap"
    assert len(os.listdir("/proc/self/fd")) == fds_before  # /dev/kvm was closed again


def _as_version_1(state: dict) -> dict:
    """The same state as an earlier release saved it: CPUID and MSRs as lists of ints."""
    import struct

    from adapters.kvm.vcpu import _CPUID_ENTRY_SIZE

    cpuid = [list(struct.unpack_from("<7I", state["cpuid"], off))
             for off in range(0, len(state["cpuid"]), _CPUID_ENTRY_SIZE)]
    n = len(state["msr_indices"]) // 4
    msrs = [list(m) for m in zip(struct.unpack(f"<{n}I", state["msr_indices"]),
                                 struct.unpack(f"<{n}Q", state["msr_values"]))]
    rest = {k: v for k, v in state.items() if k not in ("msr_indices", "msr_values")}
    return {**rest, "version": 1, "cpuid": cpuid, "msrs": msrs}


def _timeless(state: dict) -> dict:
    """The state without IA32_TSC's value, which moves between two reads."""
    v1 = _as_version_1(state)
    return {**v1, "msrs": [m for m in v1["msrs"] if m[0] != 0x10]}


def test_vcpu_state_carries_cpuid_and_msrs_as_arrays_and_still_reads_version_1(kvm):
    from domain.state_codec import decode_state, encode_state

    src, dst = Machine(kvm, irqchip=True), Machine(kvm, irqchip=True)
    try:
        src.vcpu.setup(VcpuSetup(index=0, apic_id=0, nr_vcpus=1))
        state = src.vcpu.save_state()
        assert state["version"] == 2
        assert isinstance(state["cpuid"], bytes) and len(state["cpuid"]) > 0
        assert len(state["msr_values"]) == 2 * len(state["msr_indices"]) > 0
        # A few hundred ints fewer to encode inside a migration's downtime.
        assert len(encode_state(state)) < len(encode_state(_as_version_1(state)))
        dst.vcpu.restore_state(decode_state(encode_state(_as_version_1(state))))
        assert _timeless(dst.vcpu.save_state()) == _timeless(state)
        dst.vcpu.restore_state(state)
        assert _timeless(dst.vcpu.save_state()) == _timeless(state)
    finally:
        src.close()
        dst.close()


def test_vcpu_state_arrays_of_the_wrong_size_are_refused(kvm):
    from domain.errors import SnapshotFormatError

    m = Machine(kvm, irqchip=True)
    try:
        m.vcpu.setup(VcpuSetup(index=0, apic_id=0, nr_vcpus=1))
        good = m.vcpu.save_state()
        bad = [
            {**good, "cpuid": good["cpuid"][:-1]},  # not whole entries
            {**good, "cpuid": good["cpuid"] * 300},  # more entries than KVM takes
            {**good, "msr_values": good["msr_values"][:-8]},  # a value short
            {**good, "msr_indices": good["msr_indices"][:-1]},
            {**good, "msr_indices": list(good["msr_indices"])},
            {**_as_version_1(good), "msr_indices": good["msr_indices"]},  # version 1 with 2's fields
            {**good, "version": True},
        ]
        for state in bad:
            with pytest.raises(SnapshotFormatError):
                m.vcpu.restore_state(state)
        m.vcpu.restore_state(good)
        assert _timeless(m.vcpu.save_state()) == _timeless(good)
    finally:
        m.close()
