"""VM-level rules: vCPU indexes, irqchip creation, IRQ lines, CPU setup."""

from __future__ import annotations

import errno

import pytest

from domain.cpu_state import VcpuSetup
from domain.errors import HypervisorError
from domain.ports import Hypervisor, HvVcpu, HvVm
from domain.vcpu_exit import IoOut
from tests.contract import asm
from tests.contract.conftest import refused


def test_objects_satisfy_the_ports(hypervisor, machine):
    assert isinstance(hypervisor, Hypervisor)
    assert isinstance(machine.vm, HvVm)
    assert isinstance(machine.vcpu, HvVcpu)
    assert hypervisor.kind in ("kvm", "test")
    assert hypervisor.max_vcpus() >= 1
    assert machine.vcpu.index == 0


def test_duplicate_vcpu_index_is_refused(machine):
    with refused(errno.EEXIST):
        machine.vm.create_vcpu(0)
    assert machine.vm.create_vcpu(1).index == 1


def test_irqchip_rules(hypervisor):
    vm = hypervisor.create_vm()
    try:
        with refused(errno.ENXIO):
            vm.set_irq_line(4, True)
        vm.create_irqchip()
        with refused(errno.EEXIST):
            vm.create_irqchip()
        vm.set_irq_line(4, True)
        vm.set_irq_line(4, False)
    finally:
        vm.close()


def test_irqchip_after_vcpus_is_refused(machine):
    with refused(errno.EINVAL):
        machine.vm.create_irqchip()


@pytest.mark.parametrize("irqchip", [False, True])
def test_setup_then_run(hypervisor, irqchip):
    from tests.contract.conftest import Machine

    m = Machine(hypervisor, irqchip=irqchip)
    try:
        m.vcpu.setup(VcpuSetup(index=0, apic_id=0, nr_vcpus=2, cores_per_socket=2,
                               hidden_features=("popcnt", "avx2", "xsave")))
        m.load(asm.mov_al(1) + asm.out_imm(0x80) + asm.HLT)
        assert type(m.vcpu.run()) is IoOut
    finally:
        m.close()


def test_setup_refuses_unknown_features(machine):
    with pytest.raises(HypervisorError, match="no_such_feature"):
        machine.vcpu.setup(VcpuSetup(index=0, apic_id=0, nr_vcpus=1, hidden_features=("no_such_feature",)))
