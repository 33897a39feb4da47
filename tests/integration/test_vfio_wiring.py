"""The composition root gives the device manager a VfioManager over the VM's guest RAM."""

import os

import pytest

from adapters.vfio import VfioManager
from adapters.vfio.errors import VfioError
from application.container import build_runtime
from domain.cmdline import parse_cmdline


class _Events:
    def emit(self, event):
        pass


@pytest.fixture
def runtime():
    cfg = parse_cmdline(["-accel", "test", "-machine", "q35", "-m", "128",
                         "-device", "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x2"])
    rt = build_runtime(cfg)
    rt.events, rt._request_exit = _Events(), lambda code=0: None
    rt._build_vm()
    yield rt
    rt._release_quietly()


def test_device_manager_gets_a_vfio_manager_over_guest_ram(runtime):
    dm = runtime.vm.devices
    assert not dm.vfio.built  # built on first use: a VM without passthrough does not pay for it
    assert dm.vfio.guest_memory is dm.memory is not None
    assert isinstance(dm.vfio.target, VfioManager)


def test_the_wired_manager_runs_the_real_checks(runtime):
    sys_pci = "/sys/bus/pci/devices"
    hosts = [h for h in sorted(os.listdir(sys_pci)) if not os.path.exists(os.path.join(sys_pci, h, "iommu_group"))]
    if not hosts:
        pytest.skip("every PCI device of this host has an IOMMU group")
    with pytest.raises(VfioError, match=f"VFIO {hosts[0]}: find the IOMMU group"):
        runtime.vm.devices.vfio.open_device(hosts[0])
