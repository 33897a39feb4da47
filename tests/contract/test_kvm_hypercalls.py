"""KVM only: the hypercall probe, and what setup() offers an SMP guest when hypercalls hang.

On kvm-pvm a stock guest's VMCALL never returns, and a Linux guest with two CPUs hung in its
first PV IPI (KVM_HC_SEND_IPI); setup() hides the hypercall-based PV features then.
"""

from __future__ import annotations


import pytest

from adapters.kvm import probe
from domain.cpu_state import VcpuSetup
from tests.contract import asm
from tests.contract.asm import EAX
from tests.contract.conftest import Machine
from tests.contract.test_kvm_cpu import guest_cpuid

pytestmark = pytest.mark.kvm

KVM_LEAF = 0x40000001
PV_UNHALT, PV_SEND_IPI, PV_SCHED_YIELD = 1 << 7, 1 << 11, 1 << 13
HYPERCALL_BITS = PV_UNHALT | PV_SEND_IPI | PV_SCHED_YIELD
OUT_PROBE_PORT = bytes((0xE6, probe.PORT))


def supported_kvm_features(kvm) -> int:
    return next((e[3] for e in kvm.supported_cpuid() if e[0] == KVM_LEAF), 0)


def test_probe_sees_code_that_reaches_its_out(kvm):
    done, _ = probe.reaches_out(kvm, asm.mov_r32(EAX, 1) + OUT_PROBE_PORT + asm.HLT, 2.0)
    assert done


def test_probe_gives_up_on_code_that_never_gets_there(kvm):
    spin = b"\xeb\xfe"  # jmp . : stands for a VMCALL that never returns
    done, rip = probe.reaches_out(kvm, spin + OUT_PROBE_PORT, 0.1)
    assert not done and rip == probe.CODE


def test_probe_answer_is_cached(kvm):
    first = kvm.hypercalls_complete()
    assert isinstance(first, bool) and kvm.hypercalls_complete() is first


def kvm_leaf_seen(kvm, nr_vcpus: int) -> int:
    m = Machine(kvm)
    try:
        m.vcpu.setup(VcpuSetup(index=0, apic_id=0, nr_vcpus=nr_vcpus, cores_per_socket=nr_vcpus))
        (eax,) = guest_cpuid(m, (KVM_LEAF, 0, b""))
    finally:
        m.close()
    return eax


@pytest.mark.parametrize("complete", [False, True])
def test_smp_guest_is_offered_hypercall_features_only_where_hypercalls_complete(kvm, complete):
    kvm.hypercalls_complete = lambda: complete
    supported = supported_kvm_features(kvm)
    if not supported & HYPERCALL_BITS:
        pytest.skip("this KVM offers none of the hypercall-based PV features")
    smp = kvm_leaf_seen(kvm, 2)
    assert smp & HYPERCALL_BITS == (supported & HYPERCALL_BITS if complete else 0)
    assert smp & ~HYPERCALL_BITS == supported & ~HYPERCALL_BITS  # the rest stays (kvmclock, ...)
    # One CPU: Linux makes no hypercall for these, the leaf stays as KVM offers it.
    assert kvm_leaf_seen(kvm, 1) == supported


def test_real_probe_agrees_with_what_an_smp_guest_sees(kvm):
    supported = supported_kvm_features(kvm)
    smp = kvm_leaf_seen(kvm, 2)
    expected = supported & HYPERCALL_BITS if kvm.hypercalls_complete() else 0
    assert smp & HYPERCALL_BITS == expected
