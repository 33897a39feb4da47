"""The hypervisor contract: every test here runs on the fake and on KVM.

A test that passes on KVM and fails on the fake means the fake drifted; the fake is fixed, never
the test. KVM runs are marked `kvm` and skip only when /dev/kvm is missing.
"""

from __future__ import annotations

import contextlib
import os
import threading

import pytest

from adapters.fake.hypervisor import FakeHypervisor
from domain.errors import HypervisorError
from adapters.host.memory import MmapAllocator
from tests.contract.longmode import CODE_ADDR, enter

RAM_SIZE = 2 << 20


def _kvm():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is missing")
    from adapters.kvm.hypervisor import KvmHypervisor

    return KvmHypervisor()


@pytest.fixture(params=["fake", pytest.param("kvm", marks=pytest.mark.kvm)])
def hypervisor(request):
    hv = _kvm() if request.param == "kvm" else FakeHypervisor()
    yield hv
    if hasattr(hv, "close"):
        hv.close()


@pytest.fixture
def kvm():
    """KVM alone, for the tests of what only KVM has (CPUID, hypercalls)."""
    hv = _kvm()
    yield hv
    hv.close()


@contextlib.contextmanager
def refused(err: int):
    """Expect a HypervisorError carrying errno ``err`` (KVM's answer, mirrored by the fake)."""
    with pytest.raises(HypervisorError) as info:
        yield info
    assert info.value.errno == err, info.value


class Machine:
    """A VM with RAM at 0 (slot 0) and vCPU 0, plus helpers to load and run programs."""

    def __init__(self, hv, *, irqchip: bool = False, ram: int = RAM_SIZE):
        self.hv = hv
        self.allocator = MmapAllocator()
        self.memory = self.allocator.allocate([(0, ram)])
        self.vm = hv.create_vm()
        if irqchip:
            self.vm.create_irqchip()
        self.vm.set_memory_region(0, 0, self.memory.regions[0].view)
        self.vcpu = self.vm.create_vcpu(0)
        self.extra: list = []  # more allocations owned by the test, freed on close

    def load(self, code: bytes, mode: str = "long", at: int = CODE_ADDR) -> None:
        self.memory.write(at, code)
        enter(self.vcpu, self.memory, mode, at)

    def run_in_thread(self):
        """Start vcpu.run() in a new thread; returns (thread, result list)."""
        result: list = []
        t = threading.Thread(target=lambda: result.append(self.vcpu.run()), daemon=True)
        t.start()
        return t, result

    def close(self) -> None:
        self.vm.close()
        self.allocator.free(self.memory)
        for mem in self.extra:
            self.allocator.free(mem)


@pytest.fixture
def machine(hypervisor):
    m = Machine(hypervisor)
    yield m
    m.close()


@pytest.fixture
def machine_irqchip(hypervisor):
    m = Machine(hypervisor, irqchip=True)
    yield m
    m.close()
