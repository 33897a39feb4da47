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
